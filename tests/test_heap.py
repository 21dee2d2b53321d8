"""service/heap.py: every server process, once ready, has frozen its start-up heap out of
the garbage collector, in each way of running one (one process, workers, each half
alone). Seen from inside the real processes: a sitecustomize on PYTHONPATH (it runs in
each interpreter, the spawned workers' too) reports gc.get_freeze_count() once nonzero.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from service.workers import free_port
from tests.ops_kit import poll
from tests.test_workers import READY_RE

PROBE = """
import gc, os, threading, time

def _report():
    while not gc.get_freeze_count():
        time.sleep(0.005)
    path = os.path.join(os.environ["HEAP_PROBE_DIR"], str(os.getpid()))
    with open(path + ".part", "w") as out:
        out.write(str(gc.get_freeze_count()))
    os.replace(path + ".part", path)  # whole, or not there: the test polls for it

threading.Thread(target=_report, daemon=True).start()
"""
# grpc, protobuf, aiohttp and the rest leave far more than this behind at start-up.
START_UP_OBJECTS = 50_000


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--workers", "1"],
        ["serve", "--workers", "2"],
        ["serve-grpc"],
        ["serve-rest"],
    ],
    ids=" ".join,
)
async def test_each_server_process_freezes_its_start_up_heap(
    tmp_path: Path, command: list[str]
) -> None:
    probe, frozen = tmp_path / "probe", tmp_path / "frozen"
    probe.mkdir()
    frozen.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    where = {
        "serve": ["--data-dir", str(tmp_path), "--grpc-port", str(free_port("127.0.0.1"))],
        "serve-grpc": ["--data-dir", str(tmp_path), "--grpc-port", str(free_port("127.0.0.1"))],
        "serve-rest": [],  # its service need not be up to start
    }[command[0]]
    if command[0] != "serve-grpc":
        where += ["--rest-port", str(free_port("127.0.0.1"))]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", *command, *where,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(probe), os.environ.get("PYTHONPATH", "")]),
            "HEAP_PROBE_DIR": str(frozen),
            "IMAGEGATE_METRICS_ADDRESS": "off",
        },
    )  # fmt: skip
    assert process.stdout is not None
    try:
        output = ""
        async with asyncio.timeout(90):
            while "Ctrl-C stops" not in output:
                line = (await process.stdout.readline()).decode()
                assert line, f"{command} exited early:\n{output}"
                output += line
        servers = {int(m[3]) for m in READY_RE.finditer(output)} or {process.pid}
        assert len(servers) == (4 if "2" in command else 1)

        async def reported() -> bool:
            return servers <= {int(p.name) for p in frozen.iterdir() if p.name.isdigit()}

        await poll(reported)
        for pid in servers:
            assert int((frozen / str(pid)).read_text()) > START_UP_OBJECTS
    finally:
        process.kill()
        await process.wait()
