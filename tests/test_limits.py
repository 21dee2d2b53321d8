"""Per-key limits in one service (no Redis), over both REST fronts and gRPC: 429 with
Retry-After before anything is reserved, 400 on `n` for what no retry can meet."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from imagegate.v1 import images_pb2

from service.store.base import KeyLimits
from tests.conftest import FRONTS, Stack
from tests.limits_harness import (
    BODY,
    MODEL,
    PRICE,
    GatedOpenAI,
    assert_limited,
    grpc_stub,
    models,
    open_account,
    poll,
    providers,
    reservations,
)
from tests.providers_harness import FAST_DISPATCH, provider_stack
from tests.rest import Reply, assert_error, call

CREDIT = 1_000_000
_accounts = iter(range(10**6))


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[GatedOpenAI]:
    fake = GatedOpenAI()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def lstack(
    tmp_path_factory: pytest.TempPathFactory, fake: GatedOpenAI
) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("limits"),
        providers=providers(fake),
        models=models(),
        dispatch=FAST_DISPATCH | {"breaker_failures": 1000},
    ) as stack:
        yield stack


@pytest.fixture(params=FRONTS)
def url(request: pytest.FixtureRequest, lstack: Stack) -> str:
    return lstack.fronts[request.param]


@pytest.fixture(autouse=True)
def _open_gate(fake: GatedOpenAI) -> Iterator[None]:
    fake.gate.set()
    yield
    fake.gate.set()


async def account(stack: Stack, **limits: int | None) -> tuple[str, str, str]:
    """A new account whose key has `limits`: (account name, key, key id)."""
    name = f"limited{next(_accounts)}"
    key, key_id = await open_account(stack.service.store, name, CREDIT, KeyLimits(**limits))
    return name, key, key_id


async def post(url: str, key: str, **fields: object) -> Reply:
    return await call("POST", f"{url}/v1/images/generations", key=key, json_body=BODY | fields)


async def test_requests_per_minute(url: str, lstack: Stack) -> None:
    name, key, _ = await account(lstack, rpm=2)
    assert [(await post(url, key)).status for _ in range(2)] == [200, 200]
    for _ in range(2):
        assert_limited(await post(url, key))
    # Refused before anything was reserved: only the two served requests left a record.
    assert await reservations(lstack.service.store, name) == ["settled", "settled"]
    assert (await lstack.service.store.balance(await _id(lstack, name))).balance_micros == (
        CREDIT - 2 * PRICE
    )


async def _id(stack: Stack, name: str) -> int:
    acct = await stack.service.store.get_account(name)
    assert acct is not None
    return acct.id


async def test_images_per_minute(url: str, lstack: Stack) -> None:
    name, key, _ = await account(lstack, ipm=3)
    assert (await post(url, key, n=2)).status == 200
    assert_limited(await post(url, key, n=2))  # 4 > 3
    assert (await post(url, key, n=1)).status == 200  # 3: exactly the limit
    assert_limited(await post(url, key, n=1))
    assert await reservations(lstack.service.store, name) == ["settled", "settled"]


async def test_n_no_retry_can_meet_is_a_400_on_n(url: str, lstack: Stack) -> None:
    name, key, _ = await account(lstack, max_n=2, ipm=5)
    over_max = await post(url, key, n=3)
    error = assert_error(over_max, 400, "invalid_request_error", "invalid_value", "n")
    assert "at most 2 images per request" in error["message"]
    name2, key2, _ = await account(lstack, ipm=2)
    over_ipm = await post(url, key2, n=3)
    error = assert_error(over_ipm, 400, "invalid_request_error", "invalid_value", "n")
    assert "at most 2 images per minute" in error["message"]
    assert (await post(url, key, n=2)).status == 200
    assert await reservations(lstack.service.store, name) == ["settled"]
    assert await reservations(lstack.service.store, name2) == []


async def test_concurrent_requests(url: str, lstack: Stack, fake: GatedOpenAI) -> None:
    name, key, key_id = await account(lstack, concurrency=1)
    fake.gate.clear()
    calls = len(fake.requests)
    first = asyncio.create_task(post(url, key))
    await fake.wait_for_calls(calls + 1)
    assert await lstack.service.limiter.in_flight(key_id) == 1
    assert assert_limited(await post(url, key)) == 1
    assert await reservations(lstack.service.store, name) == ["held"]  # the first one only
    fake.gate.set()
    assert (await first).status == 200
    assert await lstack.service.limiter.in_flight(key_id) == 0
    assert (await post(url, key)).status == 200
    assert len(fake.requests) == calls + 2


async def test_grpc_gets_resource_exhausted_with_retry_after(lstack: Stack) -> None:
    _, key, _ = await account(lstack, rpm=1)
    request = images_pb2.GenerateImagesRequest(model=MODEL, prompt="x", size="1024x1024")
    auth = [("authorization", f"Bearer {key}")]
    async with grpc_stub(lstack.grpc_target) as stub:
        await stub.GenerateImages(request, metadata=auth)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImages(request, metadata=auth)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = caught.value.trailing_metadata()
    assert trailers["imagegate-reason"] == "RATE_LIMITED"
    assert 1 <= int(trailers["retry-after"]) <= 60


async def test_cancelled_requests_release_their_slot(lstack: Stack, fake: GatedOpenAI) -> None:
    """A client that hangs up (gRPC cancel, or a REST connection closed) frees the slot."""
    name, key, key_id = await account(lstack, concurrency=1)
    limiter = lstack.service.limiter

    async def free() -> bool:
        return await limiter.in_flight(key_id) == 0

    request = images_pb2.GenerateImagesRequest(model=MODEL, prompt="x", size="1024x1024")
    fake.gate.clear()
    async with grpc_stub(lstack.grpc_target) as stub:
        calls = len(fake.requests)
        pending = stub.GenerateImages(request, metadata=[("authorization", f"Bearer {key}")])
        await fake.wait_for_calls(calls + 1)
        assert await limiter.in_flight(key_id) == 1
        pending.cancel()
        await poll(free)
    for url in lstack.fronts.values():
        calls = len(fake.requests)
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(
                session.post(
                    f"{url}/v1/images/generations",
                    json=BODY,
                    headers={"Authorization": f"Bearer {key}"},
                )
            )
            await fake.wait_for_calls(calls + 1)
            assert await limiter.in_flight(key_id) == 1
            task.cancel()  # closes the connection under the request
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await poll(free)
    fake.gate.set()
    assert (await post(lstack.fronts["aiohttp"], key)).status == 200
    assert set(await reservations(lstack.service.store, name)) == {"settled", "released"}


async def test_defaults_from_configuration(tmp_path: Path, fake: GatedOpenAI) -> None:
    async with provider_stack(
        tmp_path,
        providers=providers(fake),
        models=models(),
        limit_rpm=1,
        limit_max_n=2,
    ) as stack:
        url = stack.fronts[FRONTS[-1]]
        _, plain, _ = await account(stack)  # no limits of its own: the defaults
        assert_error(
            await post(url, plain, n=3), 400, "invalid_request_error", "invalid_value", "n"
        )
        assert (await post(url, plain)).status == 200
        assert_limited(await post(url, plain))
        # Its own values win: 0 is no limit, and a bigger n.
        _, own, _ = await account(stack, rpm=0, max_n=5)
        assert [(await post(url, own, n=3)).status for _ in range(3)] == [200] * 3


async def test_unreachable_redis_admits_and_logs(
    tmp_path: Path, fake: GatedOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Limits fail open (the balance still bounds spending), and say so in the log."""
    async with provider_stack(
        tmp_path,
        providers=providers(fake),
        models=models(),
        envoy=False,
        redis_url="redis://127.0.0.1:1/0",
    ) as stack:
        _, key, _ = await account(stack, rpm=1, concurrency=1)
        with caplog.at_level(logging.WARNING, logger="imagegate.limits"):
            statuses = [(await post(stack.fronts["aiohttp"], key)).status for _ in range(2)]
    assert statuses == [200, 200]
    assert any("request admitted" in r.getMessage() for r in caplog.records)


async def test_a_refused_request_leaves_its_idempotency_key_free(
    url: str, lstack: Stack, fake: GatedOpenAI
) -> None:
    """A 429 is not the key's outcome (Stripe stores none for requests that never ran)."""
    name, key, _ = await account(lstack, concurrency=1)
    fake.gate.clear()
    calls = len(fake.requests)
    first = asyncio.create_task(post(url, key))
    await fake.wait_for_calls(calls + 1)
    retry = {"Idempotency-Key": "after-429"}
    refused = await call(
        "POST", f"{url}/v1/images/generations", key=key, json_body=BODY, headers=retry
    )
    assert_limited(refused)
    fake.gate.set()
    assert (await first).status == 200
    again = await call(
        "POST", f"{url}/v1/images/generations", key=key, json_body=BODY, headers=retry
    )
    assert again.status == 200
    assert await reservations(lstack.service.store, name) == ["settled", "settled"]


STREAM = {"model": "local", "prompt": "a heron", "size": "256x256", "stream": True}


async def test_streams_are_limited_too(base_url: str, stack: Stack) -> None:
    name, key, _ = await account(stack, rpm=1, max_n=1)
    url = f"{base_url}/v1/images/generations"
    over_n = await call("POST", url, key=key, json_body={**STREAM, "n": 2})
    assert_error(over_n, 400, "invalid_request_error", "invalid_value", "n")
    first = await call("POST", url, key=key, json_body=STREAM)
    assert (first.status, first.headers["Content-Type"]) == (200, "text/event-stream")
    assert_limited(await call("POST", url, key=key, json_body=STREAM))
    assert await reservations(stack.service.store, name) == ["settled"]


async def test_a_stream_refuses_an_idempotency_key(base_url: str, stack: Stack) -> None:
    """A stream cannot be replayed: refused rather than run again for a retry."""
    name, key, _ = await account(stack)
    reply = await call(
        "POST",
        f"{base_url}/v1/images/generations",
        key=key,
        json_body=STREAM,
        headers={"Idempotency-Key": "stream-1"},
    )
    assert_error(reply, 400, "invalid_request_error", "invalid_value", "Idempotency-Key")
    assert await reservations(stack.service.store, name) == []
