"""Per-key limits shared through Redis by two service processes, one behind each front
(the machine's Redis, a key prefix of the test's own), and Redis leases on their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio

from service.leases import RedisLeases
from service.limits import Limiter, Limits
from service.store.base import KeyLimits
from tests.conftest import store_for
from tests.limits_harness import (
    BODY,
    REDIS_URL,
    GatedOpenAI,
    assert_limited,
    fronts_for,
    open_account,
    poll,
    redis_prefix,
    reservations,
    write_catalog,
)
from tests.replicas import replicas
from tests.rest import Reply, assert_error, call

CREDIT = 1_000_000
B64 = {**BODY, "response_format": "b64_json"}


@pytest.fixture
async def redis_client() -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=10, socket_connect_timeout=10)
    try:
        await client.ping()
    except redis.ConnectionError as exc:
        await client.aclose()
        pytest.fail(f"the machine's Redis is not reachable at {REDIS_URL}: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis_client: redis.asyncio.Redis) -> AsyncIterator[str]:
    prefix = redis_prefix()
    yield prefix
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis_client.delete(*keys)


@pytest.fixture
async def fake() -> AsyncIterator[GatedOpenAI]:
    fake = GatedOpenAI()
    await fake.start()
    yield fake
    fake.gate.set()
    await fake.stop()


async def post(url: str, key: str, **fields: object) -> Reply:
    return await call("POST", f"{url}/v1/images/generations", key=key, json_body=B64 | fields)


async def test_each_limit_across_two_replicas_with_redis(
    database_url: str, tmp_path: Path, fake: GatedOpenAI, prefix: str
) -> None:
    store = store_for(database_url)
    await store.open(migrate=True)
    try:
        rpm, _ = await open_account(store, "rpm", CREDIT, KeyLimits(rpm=2))
        ipm, _ = await open_account(store, "ipm", CREDIT, KeyLimits(ipm=3))
        one, _ = await open_account(store, "one", CREDIT, KeyLimits(concurrency=1))
        max_n, _ = await open_account(store, "max_n", CREDIT, KeyLimits(max_n=2))
        env = {
            "IMAGEGATE_CATALOG": str(write_catalog(fake, tmp_path)),
            "IMAGEGATE_REDIS_URL": REDIS_URL,
            "IMAGEGATE_REDIS_PREFIX": prefix,
        }
        async with (
            replicas(database_url, tmp_path, 2, env=env) as (first, second),
            fronts_for(first, second) as (a, b),
        ):
            # Requests per minute: one through each replica, then both refuse.
            assert [(await post(u, rpm)).status for u in (a, b)] == [200, 200]
            for url in (a, b):
                assert_limited(await post(url, rpm))

            # Images per minute: 2 through A, then 2 more through B is over 3.
            assert (await post(a, ipm, n=2)).status == 200
            assert_limited(await post(b, ipm, n=2))
            assert (await post(b, ipm, n=1)).status == 200

            # Requests in flight: A's is held upstream, so B refuses until it ends.
            fake.gate.clear()
            held = asyncio.create_task(post(a, one))
            await fake.wait_for_calls(len(fake.requests) + 1)
            assert assert_limited(await post(b, one)) == 1
            assert await reservations(store, "one") == ["held"]
            fake.gate.set()
            assert (await held).status == 200
            assert (await post(b, one)).status == 200

            # Images per request: a 400 on n from either replica.
            for url in (a, b):
                reply = await post(url, max_n, n=3)
                assert_error(reply, 400, "invalid_request_error", "invalid_value", "n")
        # The refused requests reserved nothing.
        assert await reservations(store, "rpm") == ["settled"] * 2
        assert await reservations(store, "ipm") == ["settled"] * 2
        assert await reservations(store, "one") == ["settled"] * 2
        assert await reservations(store, "max_n") == []
    finally:
        await store.close()


async def test_lease_of_a_stopped_process_lapses(
    redis_client: redis.asyncio.Redis, prefix: str
) -> None:
    """A lease never released (its process was killed) frees its slot after its TTL."""
    dead = RedisLeases(redis_client, prefix, ttl_s=0.3)
    assert await dead.acquire("key_1", 1) is not None  # never released, never renewed
    live = RedisLeases(redis_client, prefix, ttl_s=0.3)
    assert await live.acquire("key_1", 1) is None
    assert await live.in_flight("key_1") == 1

    async def lapsed() -> bool:
        return await live.in_flight("key_1") == 0

    await poll(lapsed)
    assert await live.acquire("key_1", 1) is not None


async def test_held_lease_is_renewed_past_its_ttl(
    redis_client: redis.asyncio.Redis, prefix: str
) -> None:
    leases = RedisLeases(redis_client, prefix, ttl_s=0.3)
    await leases.open()
    try:
        lease = await leases.acquire("key_1", 1)
        assert lease is not None
        await asyncio.sleep(1.0)  # over three TTLs: only renewal keeps it
        assert await leases.in_flight("key_1") == 1
        await leases.release("key_1", lease)
        assert await leases.in_flight("key_1") == 0
    finally:
        await leases.close()


async def test_cancellation_never_leaks_a_redis_lease(prefix: str) -> None:
    limiter = Limiter(REDIS_URL, prefix)
    await limiter.open()
    try:
        entered = asyncio.Event()

        async def request() -> None:
            async with limiter.admit("key_1", Limits(concurrency=1), 1):
                entered.set()
                await asyncio.Event().wait()  # until cancelled

        task = asyncio.create_task(request())
        await entered.wait()
        assert await limiter.in_flight("key_1") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Released before the cancellation finished: nothing to wait for.
        assert await limiter.in_flight("key_1") == 0
    finally:
        await limiter.close()
