"""Health: the gRPC health service follows database, catalog and drain; both REST fronts
answer /healthz and /readyz alike (Envoy from its gRPC health checks of the service)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig
from gateway.server import bound_port, drain_gateway, start_gateway
from service.server import SERVICE_NAME, Service, start_service
from tests.conftest import FRONTS, Stack, make_tenant, sdk, service_config
from tests.envoy_harness import envoy_front
from tests.ops_kit import poll
from tests.rest import Reply, call

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Envoy health-checks the service every 2 s: a probe's answer may lag by that much.
SETTLE_S = 20.0


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = SETTLE_S) -> None:
    await poll(check, timeout_s)


async def grpc_health(port: int, service: str = SERVICE_NAME) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(reply.status)


async def probe(url: str) -> Reply:
    with contextlib.suppress(OSError):
        return await call("GET", url)
    return Reply(0, None, b"")  # type: ignore[arg-type]


async def answers(url: str, status: int, body: bytes) -> bool:
    reply = await probe(url)
    return (reply.status, reply.body) == (status, body)


def assert_probe(reply: Reply, status: int, body: bytes) -> None:
    assert (reply.status, reply.body) == (status, body)
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.headers.get("x-request-id")


async def test_probes_alike_on_both_fronts(base_url: str, stack: Stack) -> None:
    assert_probe(await call("GET", base_url + "/healthz"), 200, b'{"status":"ok"}')
    await eventually(lambda: answers(base_url + "/readyz", 200, b'{"status":"ready"}'))
    assert_probe(await call("GET", base_url + "/readyz?verbose=1"), 200, b'{"status":"ready"}')
    for path in ("/healthz", "/readyz"):
        reply = await call("POST", base_url + path)
        assert (reply.status, reply.headers["Allow"]) == (405, "GET")
    assert (await call("GET", base_url + "/healthzz")).status == 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def fronts_for(port: int) -> AsyncIterator[dict[str, str]]:
    """Both fronts in front of 127.0.0.1:port, whether or not a service is there."""
    runner = await start_gateway(GatewayConfig(grpc_target=f"127.0.0.1:{port}"), port=0)
    urls = {"aiohttp": f"http://127.0.0.1:{bound_port(runner)}"}
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        if "envoy" in FRONTS:
            urls["envoy"] = await stack.enter_async_context(envoy_front(port))
        yield urls


async def test_readyz_unready_while_the_service_is_stopped_and_ready_when_it_returns(
    tmp_path: Path,
) -> None:
    port = _free_port()
    config = service_config(tmp_path)
    service = await start_service(config, port=port, env={})
    try:
        async with fronts_for(port) as urls:
            for url in urls.values():
                await eventually(lambda u=url: answers(u + "/readyz", 200, b'{"status":"ready"}'))
            await service.stop()
            for url in urls.values():
                await eventually(lambda u=url: answers(u + "/readyz", 503, b'{"status":"unready"}'))
                assert_probe(await call("GET", url + "/healthz"), 200, b'{"status":"ok"}')
            service = await start_service(config, port=port, env={})
            for url in urls.values():
                await eventually(lambda u=url: answers(u + "/readyz", 200, b'{"status":"ready"}'))
    finally:
        await service.stop()


async def test_no_servable_model_is_not_serving(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text("[models.local]\nenabled = false\n")
    service = await start_service(service_config(tmp_path, catalog=catalog), port=0, env={})
    try:
        assert await grpc_health(service.port) == NOT_SERVING
        assert await grpc_health(service.port, "") == NOT_SERVING
        async with fronts_for(service.port) as urls:
            assert_probe(
                await call("GET", urls["aiohttp"] + "/readyz"), 503, b'{"status":"unready"}'
            )
    finally:
        await service.stop()


async def test_database_unreachable_is_not_serving_until_it_answers_again(tmp_path: Path) -> None:
    """Another process holds the SQLite write lock: heartbeats fail (after the store's
    5 s busy timeout), the service turns NOT_SERVING, and SERVING once the lock is gone."""
    service = await start_service(
        service_config(tmp_path, heartbeat_interval_s=0.1), port=0, env={}
    )
    lock = sqlite3.connect(service.config.sqlite_path, timeout=0, isolation_level=None)
    try:
        assert await grpc_health(service.port) == SERVING
        lock.execute("BEGIN EXCLUSIVE")
        await eventually(lambda: _is(service, NOT_SERVING))
        lock.execute("ROLLBACK")
        await eventually(lambda: _is(service, SERVING))
    finally:
        lock.close()
        await service.stop()


async def _is(service: Service, status: int) -> bool:
    return await grpc_health(service.port) == status


async def test_drain_turns_not_serving_at_once_and_refuses_new_calls(tmp_path: Path) -> None:
    """In process: Service.drain and the front's drain, as `imagegate serve` runs them."""
    service = await start_service(service_config(tmp_path), port=0, env={})
    runner = await start_gateway(GatewayConfig(grpc_target=f"127.0.0.1:{service.port}"), port=0)
    url = f"http://127.0.0.1:{bound_port(runner)}"
    tenant = await make_tenant(service)
    force = asyncio.Event()
    try:
        service_drain = asyncio.ensure_future(service.drain(30, force))
        front_drain = asyncio.ensure_future(drain_gateway(runner, 30, force))
        await asyncio.sleep(0)
        # Nothing in flight: both drains end at once, yet the process still answers.
        await asyncio.wait_for(asyncio.gather(service_drain, front_drain), 5)
        assert await grpc_health(service.port) == NOT_SERVING
        assert await grpc_health(service.port, "") == NOT_SERVING
        assert_probe(await call("GET", url + "/readyz"), 503, b'{"status":"unready"}')
        assert_probe(await call("GET", url + "/healthz"), 200, b'{"status":"ok"}')
        reply = await call(
            "POST", url + "/v1/images/generations", key=tenant.key, json_body={"prompt": "x"}
        )
        assert reply.status == 503 and reply.json()["error"]["code"] == "service_unavailable"
        # The service refuses on its own too (a front of another process, or Envoy).
        other = await start_gateway(GatewayConfig(grpc_target=f"127.0.0.1:{service.port}"), port=0)
        try:
            with pytest.raises(Exception) as refused:
                await sdk(f"http://127.0.0.1:{bound_port(other)}", tenant.key).models.list()
            assert getattr(refused.value, "status_code", None) == 503
        finally:
            await other.cleanup()
    finally:
        await runner.cleanup()
        await service.stop()
