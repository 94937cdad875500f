"""One run at a time in an output folder: a lock file that names the run holding it.

Two runs writing into one folder would append their records to the same files and leave a
``config.json`` that vouches for only one of them, so a run holds its folder for as long as it
writes there. The lock is ``run.lock`` in the folder: an advisory ``flock`` on it is held by the
running process, and its text names that process (pid, host, start time, command line), so a
refusal can say who holds the folder. The kernel releases the ``flock`` when its process ends
in any way (also SIGKILL or a crash); a lock file whose lock is free was left by a process that
died, and the next run takes it over with a message saying so.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Optional

from util.errors import OutputError

LOCK_NAME = "run.lock"
log = logging.getLogger(__name__)


def _describe(holder: dict) -> str:
    """A holder in words: 'pid 123 on host h since 2026-12-07 14:30:00 (python meta_test.py ...)'."""
    if not holder:
        return "a run that left no details"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    pid, host, command = (holder.get(key, "?") for key in ("pid", "host", "command"))
    return f"pid {pid} on host {host} since {since} ({command})"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = b""
    while chunk := os.read(fd, 4096):
        text += chunk
    try:
        holder = json.loads(text.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


class FolderLock:
    """Holds ``folder`` for this process: ``with FolderLock(folder): ...``.

    Entering creates the folder when needed and takes ``folder/run.lock``; a folder held by a
    running process raises OutputError naming the folder and the holder. Leaving removes the
    lock file, and the folder too when this lock created it and nothing else was written there
    (so a run refused later, for another input, leaves the file system as it found it)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None
        self.created: Optional[Path] = None  # the topmost folder this lock created
        self.taken_over: dict = {}  # the holder named by a lock file its dead process left

    def __enter__(self) -> "FolderLock":
        missing = [f for f in (self.folder, *self.folder.parents) if not f.exists()]
        self.created = missing[-1] if missing else None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            self._remove_folder()
            raise OutputError(f"cannot write in the output folder {self.folder} ({err.strerror}): make it writable, "
                              "or write elsewhere with --exp-dir (or exp_root)") from None
        if self.taken_over:
            log.warning("%s: took over the lock of %s, which is no longer running (its records, if any, are "
                        "kept and resumed)", self.folder, _describe(self.taken_over))
        return self

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise OutputError(f"{self.folder} is in use by another run: {_describe(holder)}. Wait for it to "
                                      f"finish, or write elsewhere with --exp-dir; if no such run exists, delete "
                                      f"{self.path}") from None
                raise
            try:  # its holder may have removed the file between our open and our lock: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self.taken_over = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)

    def __exit__(self, kind: Optional[type[BaseException]], error: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before the lock goes, so a waiting run never sees a stale file
        os.close(self.fd)
        self.fd = None
        self._remove_folder()

    def _remove_folder(self) -> None:
        """The folders this lock created, up to the topmost, as long as they are empty."""
        if self.created is None:
            return
        for folder in (self.folder, *self.folder.parents):
            try:
                folder.rmdir()  # only when empty: a run that wrote something keeps its folder
            except OSError:
                return
            if folder == self.created:
                return
