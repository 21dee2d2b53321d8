"""Graceful drain on SIGTERM, with real `imagegate` processes and a slow fake upstream:
health turns NOT_SERVING at once, the request in flight finishes and is charged (or,
when the grace period ends first or a second SIGTERM comes, is cancelled and released),
nothing stays held, the balance equals the ledger, and the process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import keys
from service.store.sqlite import SqliteStore
from tests.fakes.base import Fault
from tests.fakes.openai import FakeOpenAI
from tests.ops_kit import held_count, poll
from tests.providers_harness import UNIT_PRICE, catalog_toml, model, provider, route
from tests.rest import Reply, call

CREDIT = 1_000_000
PROMPT = "a lighthouse at dusk"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Setup:
    data_dir: Path
    catalog: Path
    key: str
    fake: FakeOpenAI

    @property
    def db(self) -> Path:
        return self.data_dir / "imagegate.db"


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    fake = FakeOpenAI(openai_key=None, compatible_models={"flux-schnell"})
    await fake.start()
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        catalog_toml(
            {"compat": provider("openai_compatible", fake.openai_base, timeout_s=60)},
            {"flux": model(route("compat", "flux-schnell"))},
        )
    )
    data_dir = tmp_path / "data"
    store = SqliteStore(data_dir / "imagegate.db")
    await store.open()
    key = keys.new_key()
    try:
        await store.create_account("drain", CREDIT)
        await store.create_key("drain", keys.hash_key(key), keys.display_prefix(key), "t", None)
    finally:
        await store.close()
    try:
        yield Setup(data_dir, catalog, key, fake)
    finally:
        await fake.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    process: asyncio.subprocess.Process
    log: Path
    stdout: str

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    async def exit_code(self, timeout_s: float = 30) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout_s)

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


@contextlib.asynccontextmanager
async def imagegate(tmp: Path, *args: str) -> AsyncIterator[Proc]:
    """`imagegate ARGS` until it prints that it serves; killed (by its pid) if still running."""
    log = tmp / f"{args[0]}-{_free_port()}.log"
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.cli",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    proc = Proc(process, log, "")
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            while "Ctrl-C stops" not in proc.stdout:
                line = await process.stdout.readline()
                assert line, f"{args[0]} exited early: {proc.stdout}\n{log.read_text()[-3000:]}"
                proc.stdout += line.decode()
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def serving(setup: Setup, tmp: Path, grace_s: float) -> AsyncIterator[tuple[Proc, str, int]]:
    """`imagegate serve` on free ports: (process, REST base URL, gRPC port)."""
    grpc_port, metrics_port = _free_port(), _free_port()
    async with imagegate(
        tmp,
        "serve",
        "--data-dir",
        str(setup.data_dir),
        "--catalog",
        str(setup.catalog),
        "--rest-port",
        "0",
        "--grpc-port",
        str(grpc_port),
        "--metrics-address",
        f"127.0.0.1:{metrics_port}",
        "--drain-grace",
        str(grace_s),
    ) as proc:
        rest = proc.stdout.split("REST on ")[1].split(",")[0]
        # Metrics are on the admin listener, not on the public port.
        assert (await call("GET", rest + "/metrics")).status == 404
        metrics = await call("GET", f"http://127.0.0.1:{metrics_port}/metrics")
        assert metrics.status == 200 and b"imagegate_http_requests_total" in metrics.body
        yield proc, rest, grpc_port


async def grpc_health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="imagegate.v1.ImageService"), timeout=5
        )
    return int(reply.status)


def generate(setup: Setup, rest: str) -> asyncio.Future[Reply]:
    return asyncio.ensure_future(
        call(
            "POST",
            rest + "/v1/images/generations",
            key=setup.key,
            json_body={"model": "flux", "prompt": PROMPT, "response_format": "b64_json"},
        )
    )


async def until_held(db: Path) -> None:
    async def held() -> bool:
        return await asyncio.to_thread(held_count, db) > 0

    await poll(held)


async def until_not_serving(port: int) -> None:
    """Within two seconds of the signal: at once, give or take the process's own pace."""

    async def drained() -> bool:
        return await grpc_health(port) == NOT_SERVING

    await poll(drained, timeout_s=2)


def money(db: Path) -> tuple[int, int, int]:
    """(balance, ledger sum, reservations held) of the test's account."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (balance,) = conn.execute(
            "SELECT balance_micros FROM accounts WHERE name = 'drain'"
        ).fetchone()
        (ledger,) = conn.execute("SELECT SUM(delta_micros) FROM ledger").fetchone()
    return int(balance), int(ledger), held_count(db)


async def test_sigterm_lets_the_request_finish_and_charges_it(setup: Setup, tmp_path: Path) -> None:
    setup.fake.stall_s = 3.0
    setup.fake.inject(Fault.STALL)  # the upstream answers after 3 s
    async with serving(setup, tmp_path, grace_s=30) as (proc, rest, grpc_port):
        pending = generate(setup, rest)
        await until_held(setup.db)
        proc.signal()
        # At once: NOT_SERVING, /readyz unready, new work refused; the process still answers.
        await until_not_serving(grpc_port)
        assert (await call("GET", rest + "/readyz")).status == 503
        refused = await generate(setup, rest)
        assert refused.status == 503 and refused.json()["error"]["code"] == "service_unavailable"
        reply = await pending
        assert reply.status == 200, reply.body[:300]
        assert len(reply.json()["data"]) == 1
        assert await proc.exit_code() == 0
    assert money(setup.db) == (CREDIT - UNIT_PRICE, CREDIT - UNIT_PRICE, 0)
    messages = [line["message"] for line in proc.log_lines()]
    assert "SIGTERM: draining" in messages


async def test_grace_ends_first_the_request_is_cancelled_and_released(
    setup: Setup, tmp_path: Path
) -> None:
    setup.fake.stall_s = 20.0
    setup.fake.inject(Fault.STALL)
    async with serving(setup, tmp_path, grace_s=0.5) as (proc, rest, _):
        pending = generate(setup, rest)
        await until_held(setup.db)
        proc.signal()
        reply = await pending
        assert reply.status == 503 and reply.json()["error"]["code"] == "service_unavailable"
        assert await proc.exit_code() == 0
    assert money(setup.db) == (CREDIT, CREDIT, 0)


async def test_a_second_sigterm_cancels_and_releases_at_once(setup: Setup, tmp_path: Path) -> None:
    setup.fake.stall_s = 20.0
    setup.fake.inject(Fault.STALL)
    async with serving(setup, tmp_path, grace_s=60) as (proc, rest, grpc_port):
        pending = generate(setup, rest)
        await until_held(setup.db)
        proc.signal()
        await until_not_serving(grpc_port)
        assert not pending.done()
        proc.signal()
        reply = await asyncio.wait_for(pending, 10)  # long before the 60 s grace
        assert reply.status == 503
        assert await proc.exit_code(10) == 0
    assert money(setup.db) == (CREDIT, CREDIT, 0)


async def test_separate_service_and_front_processes_drain_alike(
    setup: Setup, tmp_path: Path
) -> None:
    """serve-grpc and serve-rest (a sidecar pair) both get SIGTERM, as a pod's containers do."""
    setup.fake.stall_s = 3.0
    setup.fake.inject(Fault.STALL)
    grpc_port = _free_port()
    async with (
        imagegate(
            tmp_path,
            "serve-grpc",
            "--data-dir",
            str(setup.data_dir),
            "--catalog",
            str(setup.catalog),
            "--grpc-port",
            str(grpc_port),
        ) as service,
        imagegate(
            tmp_path,
            "serve-rest",
            "--rest-port",
            str(rest_port := _free_port()),
            "--grpc-target",
            f"127.0.0.1:{grpc_port}",
        ) as front,
    ):
        rest = f"http://127.0.0.1:{rest_port}"
        assert (await call("GET", rest + "/readyz")).status == 200
        pending = generate(setup, rest)
        await until_held(setup.db)
        service.signal()
        front.signal()
        await until_not_serving(grpc_port)
        assert (await call("GET", rest + "/readyz")).status == 503
        reply = await pending
        assert reply.status == 200, reply.body[:300]
        assert await service.exit_code() == 0
        assert await front.exit_code() == 0
    assert money(setup.db) == (CREDIT - UNIT_PRICE, CREDIT - UNIT_PRICE, 0)
