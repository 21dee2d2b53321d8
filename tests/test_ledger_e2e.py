"""Issue 8's must-show for the ledger: 200 requests at once, credit for exactly 37 images."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
from imagegate.v1 import images_pb2, images_pb2_grpc

from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service import keys
from service.store.base import Store
from tests import pg
from tests.conftest import FRONTS, Stack, balance, make_tenant, store_for
from tests.replicas import replicas
from tests.rest import Reply, assert_error, call

PRICE = 1_000  # local, 256x256, standard: micro-USD per image
AFFORDABLE = 37
REQUESTS = 200
BODY = {
    "model": "local",
    "prompt": "a lighthouse at dusk",
    "size": "256x256",
    "response_format": "b64_json",
}


async def _burst(urls: list[str], key: str) -> dict[str, list[Reply]]:
    """REQUESTS generations, spread evenly over the fronts, released at one moment."""
    go = asyncio.Event()

    async def one(url: str) -> Reply:
        await go.wait()
        return await call("POST", f"{url}/v1/images/generations", key=key, json_body=BODY)

    tasks = {
        url: [asyncio.create_task(one(url)) for _ in range(REQUESTS // len(urls))] for url in urls
    }
    await asyncio.sleep(0)
    go.set()
    return {url: list(await asyncio.gather(*batch)) for url, batch in tasks.items()}


def _check_replies(by_front: dict[str, list[Reply]]) -> None:
    replies = [r for batch in by_front.values() for r in batch]
    assert Counter(r.status for r in replies) == {200: AFFORDABLE, 402: REQUESTS - AFFORDABLE}
    for reply in replies:
        if reply.status == 200:
            assert len(reply.json()["data"]) == 1
        else:
            assert_error(reply, 402, "insufficient_quota", "insufficient_quota")
    # Each front got REQUESTS / fronts of them and only 37 could pass: every front raced.
    for batch in by_front.values():
        assert sum(r.status == 402 for r in batch) >= len(batch) - AFFORDABLE


async def _check_books(store: Store, account: str) -> None:
    acct = await store.get_account(account)
    assert acct is not None
    assert acct.balance_micros == 0 == await store.ledger_sum(acct.id)
    rows = await store.usage(account, limit=REQUESTS + 1)
    assert [(r.status, r.cost_micros) for r in rows] == [("settled", PRICE)] * AFFORDABLE


async def test_one_service_sqlite_both_fronts(stack: Stack) -> None:
    tenant = await make_tenant(stack.service, credit_usd=str(Decimal(AFFORDABLE * PRICE) / 10**6))
    assert await balance(stack.service, tenant.account) == AFFORDABLE * PRICE
    _check_replies(await _burst(list(stack.fronts.values()), tenant.key))
    await _check_books(stack.service.store, tenant.account)


async def test_two_replicas_on_postgres_one_behind_each_front(
    postgres_url: str, tmp_path: Path
) -> None:
    store = store_for(postgres_url)
    await store.open(migrate=True)
    try:
        await store.create_account("shared", AFFORDABLE * PRICE)
        key = keys.new_key()
        await store.create_key("shared", keys.hash_key(key), keys.display_prefix(key), "", None)
        async with (
            replicas(postgres_url, tmp_path, 2) as (first, second),
            contextlib.AsyncExitStack() as fronts,
        ):
            aiohttp_front = await start_gateway(
                GatewayConfig(grpc_target=first.grpc_target), port=0
            )
            fronts.push_async_callback(aiohttp_front.cleanup)
            urls = [f"http://127.0.0.1:{bound_port(aiohttp_front)}"]
            if "envoy" in FRONTS:
                from tests.envoy_harness import envoy_front

                urls.append(await fronts.enter_async_context(envoy_front(second.port)))
            else:  # IMAGEGATE_TEST_FRONTS=aiohttp: a second aiohttp front, still two replicas
                other = await start_gateway(GatewayConfig(grpc_target=second.grpc_target), port=0)
                fronts.push_async_callback(other.cleanup)
                urls.append(f"http://127.0.0.1:{bound_port(other)}")
            _check_replies(await _burst(urls, key))
        await _check_books(store, "shared")
    finally:
        await store.close()


# Four large hd images: a render long enough to be caught holding money.
SLOW = images_pb2.GenerateImagesRequest(
    model="local", prompt="a slow harbour", n=4, size="1792x1024", quality="hd"
)
FAST = images_pb2.GenerateImagesRequest(model="local", prompt="a quick one", size="256x256")


async def _poll(conn: Any, sql: str, until: Callable[[Any], bool]) -> Any:
    async with asyncio.timeout(30):
        while True:
            if until(value := await conn.fetchval(sql)):
                return value
            # Polled: the change happens in other processes, with no event to await.
            await asyncio.sleep(0.02)


async def test_kill_9_of_one_replica_is_released_once_by_the_other(
    postgres_url: str, tmp_path: Path
) -> None:
    store = store_for(postgres_url)
    await store.open(migrate=True)
    account = await store.create_account("acme", 1_000_000)
    key = keys.new_key()
    await store.create_key("acme", keys.hash_key(key), keys.display_prefix(key), "", None)
    conn = await pg.connect(postgres_url)
    metadata = [("authorization", f"Bearer {key}")]
    held_sql = "SELECT count(*) FROM reservations WHERE status = 'held'"
    # A short heartbeat: the surviving replica finds the dead one's holds in a moment.
    fast_beat = {"IMAGEGATE_HEARTBEAT_INTERVAL_S": "0.2"}
    try:
        async with replicas(postgres_url, tmp_path, 2, env=fast_beat) as (doomed, survivor):
            async with grpc.aio.insecure_channel(doomed.grpc_target) as doomed_channel:
                stub = images_pb2_grpc.ImageServiceStub(doomed_channel)
                calls = [stub.GenerateImages(SLOW, metadata=metadata) for _ in range(2)]
                await _poll(conn, held_sql, lambda n: n == 2)
                await doomed.kill()  # SIGKILL between reserve and settle
                for call_ in calls:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await call_
            async with grpc.aio.insecure_channel(survivor.grpc_target) as channel:
                reply = await images_pb2_grpc.ImageServiceStub(channel).GenerateImages(
                    FAST, metadata=metadata
                )
                assert len(reply.data) == 1
                assert await _poll(conn, held_sql, lambda n: n == 0) == 0
        refunds = await conn.fetch(
            "SELECT r.status, count(l.id) AS refunds FROM reservations r "
            "LEFT JOIN ledger l ON l.reservation_id = r.id AND l.kind = 'refund' "
            "GROUP BY r.id, r.status"
        )
        assert sorted((r["status"], r["refunds"]) for r in refunds) == [
            ("released", 1),
            ("released", 1),
            ("settled", 0),
        ]
        now = await store.get_account("acme")
        assert now is not None
        assert now.balance_micros == 1_000_000 - PRICE == await store.ledger_sum(account.id)
    finally:
        await conn.close()
        await store.close()
