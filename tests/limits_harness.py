"""For the Idempotency-Key, limits and usage tests: a fake upstream that counts its calls
and can hold them, its catalog, and looks at the ledger a test asserts on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from imagegate.v1 import images_pb2_grpc

from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service import keys
from service.server import message_size_options
from service.store.base import KeyLimits, Store
from tests.conftest import FRONTS
from tests.fakes.openai import FakeOpenAI
from tests.providers_harness import catalog_toml, model, provider, route
from tests.replicas import Replica
from tests.rest import Reply, assert_error

MODEL = "gen"
PRICE = 1000  # micro-USD per image (providers_harness.UNIT_PRICE)
BODY: dict[str, Any] = {"model": MODEL, "prompt": "a lighthouse at dusk", "size": "1024x1024"}
REDIS_URL = "redis://127.0.0.1:6379/0"


class GatedOpenAI(FakeOpenAI):
    """An OpenAI-compatible server serving MODEL; its replies wait while `gate` is clear.

    `requests` (from FakeUpstream) counts the upstream calls: each is recorded as it
    arrives, before the gate."""

    def __init__(self) -> None:
        super().__init__(openai_key=None, compatible_models={MODEL})
        self.gate = asyncio.Event()
        self.gate.set()

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        await self.gate.wait()
        return await super()._openai(request)

    async def wait_for_calls(self, count: int) -> None:
        async with asyncio.timeout(20):
            # Polled: the call comes from the service, with nothing here to await.
            while True:
                if len(self.requests) >= count:
                    return
                await asyncio.sleep(0.01)


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 20) -> None:
    """Until `check()` holds: for changes made by a service (maybe another process)
    that sends no event to await."""
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.01)


def providers(fake: FakeOpenAI) -> dict[str, dict[str, Any]]:
    # max_n: a request of n images is one upstream call.
    return {"compat": provider("openai_compatible", fake.openai_base, max_n=10)}


def models() -> dict[str, dict[str, Any]]:
    return {MODEL: model(route("compat", MODEL))}


def write_catalog(fake: FakeOpenAI, directory: Path) -> Path:
    path = directory / "catalog.toml"
    path.write_text(catalog_toml(providers(fake), models()))
    return path


def redis_prefix() -> str:
    """A Redis key prefix of this test's own: runs and tests never share counters."""
    return f"imagegate-test-{secrets.token_hex(6)}"


async def open_account(
    store: Store, name: str, credit_micros: int, limits: KeyLimits | None = None
) -> tuple[str, str]:
    """An account with one key (with `limits`): (the key, its id)."""
    await store.create_account(name, credit_micros)
    key = keys.new_key()
    record = await store.create_key(
        name, keys.hash_key(key), keys.display_prefix(key), "test", None, limits
    )
    return key, record.id


async def reservations(store: Store, account: str) -> list[str]:
    """The statuses of the account's reservations, newest first."""
    return [row.status for row in await store.usage(account, limit=1000)]


@contextlib.asynccontextmanager
async def fronts_for(first: Replica, second: Replica) -> AsyncIterator[list[str]]:
    """The aiohttp front on `first` and Envoy on `second` (a second aiohttp front
    when IMAGEGATE_TEST_FRONTS leaves Envoy out): two replicas, one behind each."""
    async with contextlib.AsyncExitStack() as stack:
        front = await start_gateway(GatewayConfig(grpc_target=first.grpc_target), port=0)
        stack.push_async_callback(front.cleanup)
        urls = [f"http://127.0.0.1:{bound_port(front)}"]
        if "envoy" in FRONTS:
            from tests.envoy_harness import envoy_front

            urls.append(await stack.enter_async_context(envoy_front(second.port)))
        else:
            other = await start_gateway(GatewayConfig(grpc_target=second.grpc_target), port=0)
            stack.push_async_callback(other.cleanup)
            urls.append(f"http://127.0.0.1:{bound_port(other)}")
        yield urls


@contextlib.asynccontextmanager
async def grpc_stub(target: str) -> AsyncIterator[images_pb2_grpc.ImageServiceStub]:
    channel = grpc.aio.insecure_channel(target, options=message_size_options(64 * 1024 * 1024))
    try:
        yield images_pb2_grpc.ImageServiceStub(channel)
    finally:
        await channel.close()


def assert_limited(reply: Reply, longest_s: int = 60) -> int:
    """A 429 in OpenAI's shape with a Retry-After in whole seconds; returns it."""
    error = assert_error(reply, 429, "requests", "rate_limit_exceeded")
    assert "limit" in error["message"]
    retry_after = int(reply.headers["Retry-After"])
    assert 1 <= retry_after <= longest_s
    return retry_after


def dumps(body: dict[str, Any], **json_options: Any) -> bytes:
    return json.dumps(body, **json_options).encode()
