"""What a billing transaction waits for in SQLite: checkpoints inside commits (SQLite's
default) against checkpoints on a thread of their own (what the store does).

Two processes, like two `imagegate serve` workers on one database, each run a
reservation and its settlement (two BEGIN IMMEDIATE transactions, as the store
does) at a fixed rate for a while; the report is the time of each pair, by
percentile, in each mode, run one after the other on fresh databases.

    .venv/bin/python bench/sqlite_checkpoints.py [--rate 250] [--seconds 10]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

MODES = ("in-commit", "thread")


def setup(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER)")
    db.execute(
        "CREATE TABLE reservations (id INTEGER PRIMARY KEY AUTOINCREMENT, account INTEGER,"
        " amount INTEGER, state TEXT, created REAL, detail TEXT)"
    )
    db.execute("CREATE INDEX reservations_state ON reservations (state, created)")
    db.execute("INSERT INTO accounts VALUES (1, 1000000000)")
    db.close()


def checkpoints(path: Path, stop: threading.Event) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA busy_timeout=1000")
    while not stop.wait(1.0):
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    db.close()


def worker(path: Path, mode: str, rate: int, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA synchronous=NORMAL")
    stop = threading.Event()
    if mode == "thread":
        db.execute("PRAGMA wal_autocheckpoint=0")
        threading.Thread(target=checkpoints, args=(path, stop), daemon=True).start()
    took = []
    due = time.perf_counter()
    end = due + seconds
    while due < end:
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        start = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
        db.execute(
            "INSERT INTO reservations (account, amount, state, created, detail)"
            " VALUES (1, 10, 'held', ?, ?)",
            (start, "x" * 300),
        )
        db.execute("COMMIT")
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "UPDATE reservations SET state = 'settled'"
            " WHERE id = (SELECT MAX(id) FROM reservations)"
        )
        db.execute("COMMIT")
        took.append((time.perf_counter() - start) * 1000)
        due += 1 / rate
    stop.set()
    out.put(took)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=250, help="pairs per second per process")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    print("| checkpoints | pairs | p50 ms | p99 ms | p99.9 ms | max ms | over 5 ms |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        with tempfile.TemporaryDirectory(prefix="imagegate-ckpt-") as tmp:
            path = Path(tmp) / "bench.db"
            setup(path)
            out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
            procs = [
                mp.Process(target=worker, args=(path, mode, args.rate, args.seconds, out))
                for _ in range(2)
            ]
            for proc in procs:
                proc.start()
            took = sorted(out.get() + out.get())
            for proc in procs:
                proc.join()
        n = len(took)
        print(
            f"| {mode} | {n} | {took[n // 2]:.3f} | {took[int(n * 0.99)]:.3f} | "
            f"{took[int(n * 0.999)]:.3f} | {took[-1]:.3f} | {sum(t > 5 for t in took)} |"
        )


if __name__ == "__main__":
    main()
