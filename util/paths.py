"""Paths relative to the repository, and files written so that a kill never leaves a torn one."""
from __future__ import annotations

import os
from pathlib import Path

from util.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_path(p: str | Path) -> Path:
    """A path from a config, resolved against the repository root unless it is absolute."""
    if str(p) == "":
        raise ConfigError("empty path: the config value is not set")
    path = Path(p).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def temporary_twin(path: Path) -> Path:
    """A sibling file name for writing ``path`` first, unique to this process."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed over it: a kill leaves the old file or
    the new one, never a torn one."""
    tmp = temporary_twin(path)
    tmp.write_text(text)
    os.replace(tmp, path)
