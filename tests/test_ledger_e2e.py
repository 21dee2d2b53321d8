"""Issue 8's must-show for the ledger: 200 requests at once, credit for exactly 37 images."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from decimal import Decimal
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service import keys
from service.store.base import Store
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
