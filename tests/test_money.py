"""Money over the real REST path: quotes, the ledger, and parallel requests racing a balance."""

from __future__ import annotations

import asyncio

import openai

from tests.conftest import Stack, balance, make_tenant, sdk

PROMPT = "coins on a table"


async def test_balance_equals_credit_minus_quotes_and_ledger(stack: Stack) -> None:
    tenant = await make_tenant(stack.service, credit_usd="1")
    client = sdk(stack.fronts["aiohttp"], tenant.key)
    requests = [
        ("256x256", "standard", 1),
        ("1024x1536", "standard", 2),
        ("1792x1024", "hd", 1),
        ("512x512", "hd", 3),
    ]
    quotes = 0
    catalog = stack.service.core._catalog  # the prices the service really uses
    for size, quality, n in requests:
        await client.images.generate(
            model="local",
            prompt=PROMPT,
            size=size,  # type: ignore[arg-type]
            quality=quality,
            n=n,
        )  # type: ignore[arg-type]
        price = catalog.models["local"].unit_price(size, quality)
        assert price is not None
        quotes += n * price
    assert quotes == 1000 + 2 * 1500 + 3000 + 3 * 2000
    now = await balance(stack.service, tenant.account)
    assert now == 1_000_000 - quotes
    assert await stack.service.store.ledger_sum(tenant.account_id) == now
    usage = await stack.service.store.usage(tenant.account)
    assert [u.status for u in usage] == ["settled"] * 4
    assert sum(u.cost_micros for u in usage) == quotes


async def test_parallel_requests_never_overspend(stack: Stack) -> None:
    tenant = await make_tenant(stack.service, credit_usd="0.007")  # exactly 7 images
    client = sdk(stack.fronts["aiohttp"], tenant.key)

    async def one() -> int:
        try:
            await client.images.generate(
                model="local", prompt=PROMPT, size="256x256", response_format="b64_json"
            )
            return 200
        except openai.APIStatusError as err:
            return err.status_code

    statuses = await asyncio.gather(*(one() for _ in range(40)))
    assert statuses.count(200) == 7
    assert statuses.count(402) == 33
    assert await balance(stack.service, tenant.account) == 0
    assert await stack.service.store.ledger_sum(tenant.account_id) == 0
