"""Files and folders private to the user running imagegate (0700 / 0600), whatever the umask."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) if needed; a folder made here is 0700.

    An existing folder keeps its mode: it may be one the user chose (`--data-dir .`).
    """
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            # Another process made it first; it made it the same way.
            return path
        # mkdir's mode is filtered by the umask; chmod is not.
        os.chmod(path, DIR_MODE)
    return path


def create_private(path: Path) -> int:
    """A new file opened for writing, 0600 whatever the umask; FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        # The mode given to open is filtered by the umask; fchmod is not.
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def touch_private(path: Path) -> None:
    """Make sure `path` exists; created 0600 if it did not (SQLite then gives its -wal
    and -shm files the same mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(create_private(path))
