"""Idempotency-Key across two service processes sharing one database (a SQLite file, then
PostgreSQL), one behind each REST front: one upstream call and one charge per key."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import store_for
from tests.limits_harness import (
    BODY,
    PRICE,
    GatedOpenAI,
    fronts_for,
    open_account,
    reservations,
    write_catalog,
)
from tests.replicas import replicas
from tests.rest import Reply, assert_error, call

CREDIT = 1_000_000
# Images inline: each replica keeps its own image folder here (no shared S3 store).
B64 = {**BODY, "response_format": "b64_json"}


@pytest.fixture
async def fake() -> AsyncIterator[GatedOpenAI]:
    fake = GatedOpenAI()
    await fake.start()
    yield fake
    fake.gate.set()
    await fake.stop()


async def post(url: str, key: str, idem: str, body: dict[str, object] = B64) -> Reply:
    return await call(
        "POST",
        f"{url}/v1/images/generations",
        key=key,
        json_body=body,
        headers={"Idempotency-Key": idem},
    )


async def test_two_replicas_one_behind_each_front(
    database_url: str, tmp_path: Path, fake: GatedOpenAI
) -> None:
    store = store_for(database_url)
    await store.open(migrate=True)
    try:
        key, _ = await open_account(store, "shared", CREDIT)
        env = {"IMAGEGATE_CATALOG": str(write_catalog(fake, tmp_path))}
        async with (
            replicas(database_url, tmp_path, 2, env=env) as (first, second),
            fronts_for(first, second) as urls,
        ):
            # Five in a row, alternating replicas.
            sequential = [
                await post(url, key, "five") for url in itertools.islice(itertools.cycle(urls), 5)
            ]
            assert [r.status for r in sequential] == [200] * 5
            assert len({r.body for r in sequential}) == 1
            assert len(fake.requests) == 1

            # Twenty at once, ten through each front, while the first is held upstream.
            fake.gate.clear()
            tasks = [
                asyncio.create_task(post(url, key, "twenty"))
                for url in itertools.islice(itertools.cycle(urls), 20)
            ]
            await fake.wait_for_calls(2)
            fake.gate.set()
            burst = await asyncio.gather(*tasks)
            assert [r.status for r in burst] == [200] * 20
            assert len({r.body for r in burst}) == 1

            for url in urls:
                conflict = await post(url, key, "twenty", {**B64, "prompt": "something else"})
                assert_error(conflict, 409, "invalid_request_error", "idempotency_key_conflict")
        assert len(fake.requests) == 2
        account = await store.get_account("shared")
        assert account is not None
        assert account.balance_micros == CREDIT - 2 * PRICE == await store.ledger_sum(account.id)
        assert await reservations(store, "shared") == ["settled", "settled"]
    finally:
        await store.close()
