"""The bench's event-loop stall watch: off without a `stall_log` folder; with one, a loop
held by a blocking call shows in the log as a stall at least that long."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from service import stall_watch
from service.config import Config

HOLD_S = 0.2


async def _hold_the_loop() -> str:
    await asyncio.sleep(0.05)  # the watch is running
    time.sleep(HOLD_S)  # noqa: ASYNC251 - a blocking call on the loop: the stall to find
    await asyncio.sleep(0.05)
    return "done"


async def test_off_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Config.from_env({}).stall_log == ""
    assert await stall_watch.watched(_hold_the_loop(), "front", "") == "done"
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240


async def test_a_held_loop_is_logged(tmp_path: Path) -> None:
    folder = Config.from_env({"IMAGEGATE_STALL_LOG": str(tmp_path)}).stall_log
    started = time.time()
    assert await stall_watch.watched(_hold_the_loop(), "service", folder) == "done"
    [log] = tmp_path.iterdir()  # noqa: ASYNC240
    assert log.name == f"service-{os.getpid()}.log"
    lines = [line.split() for line in log.read_text().splitlines()]
    assert lines and all(int(t) >= int(started) - 1 for t, _ in lines)
    # The hold, less at most one tick of the watch.
    assert max(float(ms) for _, ms in lines) >= (HOLD_S - stall_watch.TICK_S) * 1000
