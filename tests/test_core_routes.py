"""Money under dispatch, with the real ImageCore and SQLite store and scripted providers:
charged once per delivered image whatever the retries and failovers, route and upstream
cost recorded, token-priced models settled from reported usage."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service import keys
from service.catalog import DispatchSettings, load_catalog
from service.core import Caller, Generation, ImageCore, RequestContext
from service.errors import ContentPolicy, UpstreamError
from service.images import ImageStore
from service.providers.base import TokenUsage
from service.providers.dispatch import Dispatcher
from service.requests import GenerationParams
from service.store.sqlite import SqliteStore
from tests.fakes.scripted import OK, ScriptedProvider, Step, fail, refuse
from tests.providers_harness import catalog_toml, model, route

CREDIT = 10_000_000
CTX = RequestContext("req-1", "http://127.0.0.1:8080")
TOKEN_PRICES = {"text_input": 5_000_000, "image_input": 10_000_000, "output": 40_000_000}
CATALOG = catalog_toml(
    providers={"a": {"kind": "openai_compatible"}, "b": {"kind": "openai_compatible"}},
    models={
        "two": model(
            route("a", "model-a", upstream_prices={"standard": {"1024x1024": 700}}),
            route("b", "model-b"),
        ),
        "only-a": model(route("a", "model-a")),
        "tokens": model(route("a", "gpt-image-1"), token_prices=TOKEN_PRICES),
        # 2.5 micro-USD per output token: fractions to round.
        "tokens-frac": model(route("a", "gpt-image-1"), token_prices={"output": 2_500_000}),
    },
)


@dataclass
class Parts:
    core: ImageCore
    store: SqliteStore
    a: ScriptedProvider
    b: ScriptedProvider
    caller: Caller

    async def balance(self) -> int:
        account = await self.store.get_account("acct")
        assert account is not None
        assert await self.store.ledger_sum(account.id) == account.balance_micros
        return account.balance_micros

    async def last_usage(self):  # type: ignore[no-untyped-def]
        return (await self.store.usage("acct", 1))[0]


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    path = tmp_path / "catalog.toml"
    path.write_text(CATALOG)
    catalog = load_catalog(path)
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    a, b = ScriptedProvider("a", max_n=1), ScriptedProvider("b")
    providers = {"a": a, "b": b}
    settings = DispatchSettings(max_attempts=2, backoff_base_s=0.001, backoff_max_s=0.001)
    core = ImageCore(
        catalog=catalog,
        store=store,
        providers=providers,
        images=ImageStore(tmp_path / "images", b"secret", 3600),
        default_model="two",
        upstream_timeout_s=5,
        reservation_ttl_s=900,
        dispatcher=Dispatcher(providers, settings, upstream_timeout_s=5),
    )
    await store.create_account("acct", CREDIT)
    key = keys.new_key()
    await store.create_key("acct", keys.hash_key(key), "p", "", None)
    yield Parts(core, store, a, b, await core.authenticate(f"Bearer {key}"))
    await store.close()


async def as_is(gen: Generation) -> Generation:
    return gen


def params(model_id: str = "two", n: int = 1, prompt: str = "p") -> GenerationParams:
    return GenerationParams(prompt=prompt, model=model_id, n=n, response_format="b64_json")


async def test_failover_is_charged_once_per_image_and_records_the_route(parts: Parts) -> None:
    parts.a.default = fail()
    gen = await parts.core.generate(parts.caller, params(n=2), CTX, as_is)
    assert len(gen.images) == 2 and gen.cost_micros == 2000
    # Two calls of one (a's cap), each tried twice on a, then served by b.
    assert len(parts.a.calls) == 4 and len(parts.b.calls) == 2
    assert await parts.balance() == CREDIT - 2000
    row = await parts.last_usage()
    assert (row.status, row.cost_micros, row.provider, row.upstream_model) == (
        "settled",
        2000,
        "b",
        "model-b",
    )
    # b has no upstream_prices of its own: the model's list price.
    assert row.upstream_cost_micros == 2000


async def test_route_upstream_prices_are_recorded(parts: Parts) -> None:
    await parts.core.generate(parts.caller, params(n=3), CTX, as_is)
    row = await parts.last_usage()
    assert (row.provider, row.upstream_model, row.upstream_cost_micros) == ("a", "model-a", 2100)
    assert row.cost_micros == 3000


async def test_partial_success_charges_only_delivered_images(parts: Parts) -> None:
    parts.a.then(OK, fail(retryable=False), OK)
    gen = await parts.core.generate(parts.caller, params("only-a", n=3), CTX, as_is)
    assert len(gen.images) == 2 and gen.cost_micros == 2000
    assert await parts.balance() == CREDIT - 2000


async def test_mixed_routes_are_all_recorded(parts: Parts) -> None:
    # Call 1 served by a; call 2 fails on a (not retryable) and fails over to b.
    parts.a.then(OK, fail(retryable=False))
    await parts.core.generate(parts.caller, params(n=2), CTX, as_is)
    row = await parts.last_usage()
    assert (row.provider, row.upstream_model) == ("a,b", "model-a,model-b")
    assert row.upstream_cost_micros == 700 + 1000 and row.cost_micros == 2000


async def test_safety_refusal_releases_everything_without_failover(parts: Parts) -> None:
    parts.a.then(refuse())
    with pytest.raises(ContentPolicy):
        await parts.core.generate(parts.caller, params(), CTX, as_is)
    assert parts.b.calls == []
    assert await parts.balance() == CREDIT
    assert (await parts.last_usage()).status == "released"


async def test_every_route_failing_releases_everything(parts: Parts) -> None:
    parts.a.default = fail()
    parts.b.default = fail(retryable=False)
    with pytest.raises(UpstreamError):
        await parts.core.generate(parts.caller, params(n=2), CTX, as_is)
    assert await parts.balance() == CREDIT


def _tokens_quote(prompt: str, n: int, unit: int = 1000) -> int:
    # n x list price + (prompt bytes + 64 overhead) x n calls x 5 micro-USD per token.
    return n * unit + (len(prompt.encode()) + 64) * n * 5


async def test_token_priced_reservation_covers_the_most_it_can_cost(parts: Parts) -> None:
    prompt = "naïve café " * 10  # multi-byte: bytes, not characters, bound the tokens
    parts.a.default = Step(delay_s=0.2)
    task = parts.core.generate(parts.caller, params("tokens", n=2, prompt=prompt), CTX, as_is)
    running = asyncio.create_task(task)
    await asyncio.sleep(0.05)
    held = CREDIT - await parts.balance()
    assert held == _tokens_quote(prompt, 2)
    await running


async def test_token_priced_settles_from_reported_usage(parts: Parts) -> None:
    usage = TokenUsage(input_text_tokens=13, input_image_tokens=0, output_tokens=20)
    parts.a.default = Step(usage=usage)
    gen = await parts.core.generate(parts.caller, params("tokens", n=2), CTX, as_is)
    # Two calls: 2 x (13 x 5 + 20 x 40) = 1730 micro-USD, charged instead of 2 x 1000.
    assert gen.cost_micros == 1730
    assert gen.usage == TokenUsage(26, 0, 40)
    assert await parts.balance() == CREDIT - 1730
    assert (await parts.last_usage()).upstream_cost_micros == 1730


async def test_token_cost_is_rounded_up_to_the_micro_usd(parts: Parts) -> None:
    parts.a.default = Step(usage=TokenUsage(output_tokens=3))
    # 3 x 2.5 = 7.5 micro-USD: 8. Two calls are summed before rounding: 15.
    gen = await parts.core.generate(parts.caller, params("tokens-frac"), CTX, as_is)
    assert gen.cost_micros == 8
    gen = await parts.core.generate(parts.caller, params("tokens-frac", n=2), CTX, as_is)
    assert gen.cost_micros == 15


async def test_token_cost_is_capped_by_the_delivered_images(parts: Parts) -> None:
    # 100 output tokens = 4000 micro-USD, over the 1000 list price: capped
    # at the list price plus the prompt's bound (not disbelieved: under 10x that).
    parts.a.default = Step(usage=TokenUsage(output_tokens=100))
    gen = await parts.core.generate(parts.caller, params("tokens"), CTX, as_is)
    assert gen.cost_micros == min(4000, _tokens_quote("p", 1))


@pytest.mark.parametrize(
    "usage",
    [
        TokenUsage(-5, 0, -100),
        TokenUsage(0, 0, -1),
        TokenUsage(0, 0, 10**9),
        TokenUsage(0, 0, 5000),
    ],
)
async def test_absurd_usage_is_refused_and_charged_per_image(
    parts: Parts, usage: TokenUsage, caplog: pytest.LogCaptureFixture
) -> None:
    parts.a.default = Step(usage=usage)
    with caplog.at_level(logging.WARNING, "imagegate.costs"):
        gen = await parts.core.generate(parts.caller, params("tokens", n=2), CTX, as_is)
    assert gen.cost_micros == 2000
    assert gen.usage == TokenUsage()
    assert await parts.balance() == CREDIT - 2000
    assert "makes no sense" in caplog.text


async def test_no_usage_reported_is_charged_per_image(parts: Parts) -> None:
    gen = await parts.core.generate(parts.caller, params("tokens", n=2), CTX, as_is)
    assert gen.cost_micros == 2000


async def test_old_database_gains_the_route_columns_once(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE reservations (id TEXT PRIMARY KEY, account_id INTEGER NOT NULL, "
            "key_id TEXT NOT NULL, request_id TEXT NOT NULL, model TEXT NOT NULL, "
            "n INTEGER NOT NULL, size TEXT NOT NULL, quality TEXT NOT NULL, "
            "amount_micros INTEGER NOT NULL, cost_micros INTEGER NOT NULL DEFAULT 0, "
            "status TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, "
            "resolved_at REAL)"
        )
    for _ in range(2):  # idempotent: the second open finds them
        store = SqliteStore(path)
        await store.open()
        await store.close()
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(reservations)")}
    assert {"provider", "upstream_model", "upstream_cost_micros"} <= columns
