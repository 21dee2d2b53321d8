"""The embedded store's WAL checkpoints run on their own thread, never in a request's
commit: the commit that would have crossed SQLite's 1000-page mark no longer waits
for a sync to disk (service/store/sqlite_checkpoint.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from service.store.sqlite import SqliteStore

# Enough credits to write well over SQLite's default autocheckpoint of 1000 pages.
WRITES = 1500


async def _write_a_lot(store: SqliteStore) -> None:
    await store.create_account("acme", 0)
    for _ in range(WRITES):
        await store.add_credit("acme", 1, note="x" * 200)


def _sizes(path: Path) -> tuple[int, int]:
    """The database file's size and its WAL's (0: no WAL file)."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0


async def test_commits_never_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "idle.db"
    store = SqliteStore(path, checkpoint_interval_s=3600)  # the thread never gets to it
    await store.open()
    try:
        size, _ = _sizes(path)
        await _write_a_lot(store)
        # Everything written is still in the WAL: no commit copied it to the database.
        now, wal = _sizes(path)
        assert now == size and wal > 1000 * 4096
    finally:
        await store.close()


async def test_the_checkpoint_thread_copies_the_wal_into_the_database(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    store = SqliteStore(path, checkpoint_interval_s=0.05)
    await store.open()
    try:
        size, _ = _sizes(path)
        await _write_a_lot(store)
        for _ in range(100):
            if _sizes(path)[0] > size:
                break
            await asyncio.sleep(0.05)
        assert _sizes(path)[0] > size
        assert (await store.get_account("acme")) is not None
    finally:
        await store.close()
    # Closed: the last connection checkpointed what was left and removed the WAL.
    assert _sizes(path)[1] == 0
    db = sqlite3.connect(path)
    try:
        [(balance,)] = db.execute("SELECT balance_micros FROM accounts").fetchall()
    finally:
        db.close()
    assert balance == WRITES
