"""An upstream that fails about 30% of its calls, under concurrency: every request ends
with balance = credit - price * images delivered, and nothing held (issue 8's rule).

Real parts throughout: the service and both fronts over an OpenAI-compatible fake on
127.0.0.1 whose calls fail at random (seeded), split n into one call per image so
that many requests are partly served, and no retries, so failures reach the money.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.conftest import Stack, make_tenant
from tests.fakes.base import Fault
from tests.fakes.openai import FakeOpenAI
from tests.providers_harness import (
    FAST_DISPATCH,
    UNIT_PRICE,
    model,
    provider,
    provider_stack,
    route,
)
from tests.rest import call

CREDIT = 5_000_000
REQUESTS = 48
FAILURE_RATE = 0.3


class FlakyOpenAI(FakeOpenAI):
    """Answers HTTP 500 to a seeded random 30% of its calls."""

    def __init__(self) -> None:
        super().__init__(openai_key=None, compatible_models={"flaky"})
        self.rng = random.Random(30)
        self.failed = 0

    async def take_fault(self, request: web.Request) -> Fault | None:
        if self.rng.random() < FAILURE_RATE:
            self.failed += 1
            return Fault.SERVER_ERROR
        return await super().take_fault(request)


@pytest.fixture(scope="module")
async def flaky() -> AsyncIterator[FlakyOpenAI]:
    fake = FlakyOpenAI()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def fstack(
    tmp_path_factory: pytest.TempPathFactory, flaky: FlakyOpenAI
) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("flaky"),
        providers={"compat": provider("openai_compatible", flaky.openai_base, max_n=1)},
        models={"flaky": model(route("compat", "flaky"))},
        env={},
        # One attempt, a breaker that never opens: every upstream failure costs an image.
        dispatch=FAST_DISPATCH | {"max_attempts": 1, "breaker_failures": 100_000},
    ) as stack:
        yield stack


async def test_money_matches_delivered_images_when_a_third_of_calls_fail(
    fstack: Stack, flaky: FlakyOpenAI
) -> None:
    tenant = await make_tenant(fstack.service, credit_usd=str(CREDIT / 1_000_000))
    rng = random.Random(8)
    fronts = list(fstack.fronts.values())

    async def one(i: int) -> tuple[int, int]:
        body = {
            "model": "flaky",
            "prompt": f"a moth {i}",
            "n": rng.randint(1, 4),
            "size": "256x256",
            "response_format": rng.choice(["url", "b64_json"]),
        }
        reply = await call(
            "POST",
            f"{fronts[i % len(fronts)]}/v1/images/generations",
            key=tenant.key,
            json_body=body,
        )
        return reply.status, len(reply.json().get("data", [])) if reply.status == 200 else 0

    results = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    delivered = sum(images for _, images in results)
    statuses = {status for status, _ in results}
    # The upstream really failed, and both outcomes happened: some requests were
    # served (wholly or partly) and some got the table's 502.
    assert flaky.failed > 0 and statuses == {200, 502}, (flaky.failed, statuses)

    store = fstack.service.store
    account = await store.get_account(tenant.account)
    assert account is not None
    usage = await store.usage(tenant.account, limit=1000)
    assert len(usage) == REQUESTS
    assert [u for u in usage if u.status == "held"] == []
    assert account.balance_micros == CREDIT - UNIT_PRICE * delivered
    assert await store.ledger_sum(tenant.account_id) == account.balance_micros
