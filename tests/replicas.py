"""Service replicas as separate processes (`imagegate serve-grpc`), sharing one database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

READY = re.compile(r"gRPC on [^ ]+:(\d+)\.")
START_TIMEOUT_S = 30.0


@dataclass
class Replica:
    proc: asyncio.subprocess.Process
    port: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 15)

    async def kill(self) -> None:
        """kill -9: no release, no cleanup, as a crash leaves things."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


async def start_replica(
    database_url: str, data_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> Replica:
    """`imagegate serve-grpc` on a free port; returns once it serves."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "serve-grpc",
        "--grpc-port",
        "0",
        "--database-url",
        database_url,
        "--data-dir",
        str(data_dir),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout
    output = ""
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while not (ready := READY.search(output)):
                line = await proc.stdout.readline()
                assert line, f"serve-grpc exited early:\n{output}"
                output += line.decode()
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    # Keep reading its output so a chatty replica never blocks on a full pipe.
    asyncio.get_running_loop().create_task(_drain(proc.stdout))
    return Replica(proc, int(ready[1]))


async def _drain(stream: asyncio.StreamReader) -> None:
    with contextlib.suppress(Exception):
        while await stream.readline():
            pass


@contextlib.asynccontextmanager
async def replicas(
    database_url: str, root: Path, count: int, env: dict[str, str] | None = None
) -> AsyncIterator[list[Replica]]:
    """`count` replicas started in parallel, each with its own data dir; stopped after."""
    started = await asyncio.gather(
        *(start_replica(database_url, root / f"replica{i}", env=env) for i in range(count)),
        return_exceptions=True,
    )
    running = [r for r in started if isinstance(r, Replica)]
    try:
        for result in started:
            if isinstance(result, BaseException):
                raise result
        yield running
    finally:
        for replica in running:
            await replica.stop()
