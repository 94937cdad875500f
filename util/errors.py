"""Project error classes, and the one place where entry scripts turn them into exits.

Library code raises exceptions whose message names the thing that is wrong and what to do
(docs/errors.md); only the entry scripts (meta_test.py, train.py, dataset/demo.py,
evaluation/report.py, dataset/get_mulway_base_data.py) end the process, through ``user_errors``: one
line on stderr and a non-zero exit, the traceback only with ``--debug``. Exceptions that are
not a user's mistake (a bug) keep their traceback. Ctrl-C (SIGINT) and SIGTERM end an entry
script with one line too, saying what is kept, and the shell's exit code for the signal (130, 143).
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

USAGE_EXIT = 2  # command-line and config mistakes, as argparse does
INPUT_EXIT = 1  # data, checkpoint, episode file, output folder, device


class ProjectError(Exception):
    """A user's input is wrong; ``exit_code`` is what an entry script exits with."""

    exit_code = INPUT_EXIT


class UsageError(ProjectError, ValueError):
    """A command-line or config value that cannot work."""

    exit_code = USAGE_EXIT


class ConfigError(UsageError):
    """A config file or override is invalid (a ValueError; entry scripts exit with 2)."""


class ConfigFileNotFound(FileNotFoundError):
    """The config file does not exist (entry scripts exit with 2, a usage error)."""

    exit_code = UsageError.exit_code


class DataError(ProjectError, ValueError):
    """A data, list, label, image or episode file is missing, unreadable or inconsistent."""


class OutputError(ProjectError):
    """The output folder holds something the new run would contradict or destroy."""


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM ended the work; ``kept`` says what survives it. A BaseException,
    as KeyboardInterrupt is, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, kept: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.kept = signum, kept
        self.exit_code = 128 + signum  # what a shell reports for a process its signal ended


# OSError covers the file-system side of the user's inputs (missing files, permissions, a
# full disk) and always names the path; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ProjectError, OSError)

_WORKER_HEADER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_EXCEPTION_NAME = re.compile(r"^[A-Za-z_][\w.]*: ")


def _worker_message(text: str) -> str:
    """The original message inside the text of an exception re-raised from a DataLoader worker.

    torch re-raises a worker's exception in the main process as the same type whose message
    is "Caught X in DataLoader worker process N" plus the worker's formatted traceback; the
    message is what follows the last frame (its ``  File`` line and its indented code lines)."""
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if not frames:
        return text
    rest = lines[frames[-1] + 1:]
    while rest and rest[0].startswith("    "):
        rest = rest[1:]
    message = "\n".join(rest).strip()
    return _EXCEPTION_NAME.sub("", message, count=1) or text


def describe(err: BaseException) -> str:
    """The user-facing message of an exception, the same whether it was raised in the main
    process or in a DataLoader worker."""
    text = str(err)
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    if _WORKER_HEADER.match(text):
        text = _worker_message(text)
    return text.strip() or type(err).__name__


def exit_code(err: BaseException) -> int:
    return getattr(err, "exit_code", INPUT_EXIT)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in this process while the block runs (DataLoader
    workers forked from it keep Python's own reaction: they end, and the main process reports)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def interrupt(signum: int, frame) -> None:
        if os.getpid() != owner:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def kept_on_interrupt(kept: str) -> Iterator[None]:
    """Within the block, an interruption says ``kept``: what survives it and how to go on."""
    try:
        yield
    except Interrupted as err:
        raise Interrupted(err.signum, kept) from None


@contextmanager
def user_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Run an entry script's body: a user error ends the process with one message on stderr
    and its exit code (2 for usage/config, 1 otherwise); ``debug`` re-raises it instead.
    SIGINT and SIGTERM end it with one line (and what is kept) and exit 130 / 143."""
    try:
        with _signals_interrupt():
            yield
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"{prog}: error: {describe(err)}", file=sys.stderr)
        raise SystemExit(exit_code(err)) from None
    except Interrupted as err:
        print(f"{prog}: interrupted by {err}" + (f": {err.kept}" if err.kept else ""), file=sys.stderr)
        raise SystemExit(err.exit_code) from None

