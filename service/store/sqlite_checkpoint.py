"""WAL checkpoints on a thread of their own, never inside a request's commit.

By default SQLite checkpoints inside whichever COMMIT pushes the WAL past 1000
pages, and a checkpoint syncs the database to disk: on the machines we measured,
an fsync is 0.3 ms typically and 5-16 ms one time in ten. Under load that
commit belongs to a request, and since each process's store runs its
transactions one after another on one thread, every request behind it waits
too. So the store's connection never checkpoints (wal_autocheckpoint=0), and
this thread, with its own connection, checkpoints after writes, at most once
per interval. PASSIVE: it never waits for readers or writers, and a checkpoint
that another process is already running is simply skipped.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# Often enough that the WAL stays a few MB at a few hundred writes a second.
INTERVAL_S = 1.0


class Checkpointer:
    def __init__(self, path: Path, interval_s: float = INTERVAL_S) -> None:
        self._path = path
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Set by the store after each write transaction (a plain flag: the GIL makes
        # the store/checkpointer hand-off safe, and a missed write waits one interval).
        self.dirty = False

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="imagegate-sqlite-checkpoint", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(self._interval_s):
                if not self.dirty:
                    continue
                self.dirty = False
                if db is None:
                    db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
                    # A writer holding the lock for a moment must not fail a checkpoint.
                    db.execute("PRAGMA busy_timeout=1000")
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    # The next round tries again; a store that cannot be written fails
                    # its requests on its own.
                    self.dirty = True
                    log.warning("sqlite checkpoint failed: %s", exc)
        finally:
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
