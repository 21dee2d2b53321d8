"""An event-loop stall watch for the bench, off unless the `stall_log` setting
(IMAGEGATE_STALL_LOG) names a folder.

A task wakes every TICK_S and measures how late it woke: a stall of the loop (a
callback that holds it) shows as that lateness, to within one tick. Each second
it appends "<unix time> <longest lateness in ms>" to <folder>/<role>-<pid>.log,
one small write a second, so the bench can read the longest stall of any time
window of its own (bench/bench.py). Never set in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

TICK_S = 0.002
T = TypeVar("T")


async def watched(work: Awaitable[T], role: str, folder: str) -> T:
    """`work`, with the watch running beside it when `folder` is set."""
    if not folder:
        return await work
    watch = asyncio.create_task(_watch(Path(folder) / f"{role}-{os.getpid()}.log"))
    try:
        return await work
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


async def _watch(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    worst, second = 0.0, int(time.time())
    try:
        while True:
            due = time.monotonic() + TICK_S
            await asyncio.sleep(TICK_S)
            worst = max(worst, time.monotonic() - due)
            now = int(time.time())
            if now != second:
                os.write(fd, f"{second} {worst * 1000:.2f}\n".encode())
                worst, second = 0.0, now
    finally:
        os.write(fd, f"{second} {worst * 1000:.2f}\n".encode())
        os.close(fd)
