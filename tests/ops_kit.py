"""Helpers for the operations tests: scraping /metrics, reading the ledger, a slow fake."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from service.admin_http import admin_url, start_admin
from service.server import Service

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Scrape:
    samples: Samples
    content_type: str

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def parse(text: str, content_type: str = "") -> Scrape:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, content_type)


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200, response.status
        return parse(await response.text(), response.headers["Content-Type"])


@contextlib.asynccontextmanager
async def metrics_listener(service: Service | None = None) -> AsyncIterator[str]:
    """The admin listener on a free port (refreshing `service`'s gauges); its /metrics URL."""
    runner = await start_admin("127.0.0.1:0", service.refresh_gauges if service else None)
    assert runner is not None
    try:
        yield f"{admin_url(runner)}/metrics"
    finally:
        await runner.cleanup()


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def ledger_by_kind(db: Path) -> Mapping[str, int]:
    """Sum of the ledger's deltas by kind (credit, reserve, refund), whole database."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT kind, SUM(delta_micros) FROM ledger GROUP BY kind").fetchall()
    return {kind: int(total) for kind, total in rows}


def held_count(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM reservations WHERE status = 'held'"
        ).fetchone()
    return int(count)


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    """Until `check()` is true: for what happens in another process or on a timer."""
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)
