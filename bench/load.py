"""A bounded load generator run in its own process, so it does not share the servers' loop."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None = None
    requests: int = 2000
    concurrency: int = 16
    # Hard stop, whatever the count: a benchmark never runs away.
    max_seconds: float = 30.0


@dataclass(frozen=True)
class Result:
    done: int
    failed: int
    seconds: float

    @property
    def rps(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


async def _drive(load: Load) -> Result:
    import aiohttp

    statuses: list[int] = []
    deadline = time.perf_counter() + load.max_seconds
    remaining = iter(range(load.requests))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=load.concurrency)
    ) as session:

        async def worker() -> None:
            for _ in remaining:
                if time.perf_counter() > deadline:
                    return
                async with session.request(
                    load.method, load.url, data=load.body, headers=load.headers
                ) as resp:
                    await resp.read()
                    statuses.append(resp.status)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        seconds = time.perf_counter() - start
    ok = sum(1 for s in statuses if s == 200)
    return Result(ok, len(statuses) - ok, seconds)


def _child(load: Load, conn: multiprocessing.connection.Connection) -> None:
    result = asyncio.run(_drive(load))
    conn.send(json.dumps(result.__dict__))
    conn.close()


async def run_load(load: Load) -> Result:
    """Run `load` in a child process and wait for its result without blocking the loop."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(load, child))
    proc.start()
    try:
        data = await asyncio.to_thread(parent.recv)
    finally:
        await asyncio.to_thread(proc.join, load.max_seconds + 30)
        if proc.is_alive():
            proc.kill()
    return Result(**json.loads(data))
