"""Prometheus metrics: what a scrape of /metrics shows after real requests through a front.

The service, the aiohttp front and an OpenAI-compatible fake upstream run on
127.0.0.1; the admin listener is the one `imagegate serve` starts. Counters
are process-wide, so every check compares a scrape before and after.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import openai
import pytest
from prometheus_client import REGISTRY, generate_latest

from service import keys
from service.admin_http import multiprocess_metrics, start_admin
from service.store.base import Charge
from tests.conftest import Stack, Tenant, make_tenant, sdk, store_for
from tests.fakes.base import Fault
from tests.fakes.openai import FakeOpenAI
from tests.ops_kit import (
    delta,
    held_count,
    ledger_by_kind,
    metrics_listener,
    parse,
    poll,
    scrape,
)
from tests.providers_harness import (
    FAST_DISPATCH,
    UNIT_PRICE,
    model,
    provider,
    provider_stack,
    route,
)

PROMPT = "a lighthouse at dusk"
GEN = {"rpc": "GenerateImages", "model": "flux"}


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    upstream = FakeOpenAI(openai_key=None, compatible_models={"flux-schnell"})
    upstream.stall_s = 2.0  # a STALL here is a slow answer, within the route's timeout
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture(scope="module")
async def mstack(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI
) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("metrics"),
        providers={"compat": provider("openai_compatible", fake.openai_base, max_n=4)},
        models={"flux": model(route("compat", "flux-schnell"))},
        env={},
        envoy=False,
        dispatch=FAST_DISPATCH,
    ) as stack:
        yield stack


async def test_requests_stages_upstream_money_breaker_and_grpc_counters(
    mstack: Stack, fake: FakeOpenAI
) -> None:
    service = mstack.service
    db = service.config.sqlite_path
    rich = await make_tenant(service, "1")
    poor = await make_tenant(service, "0.000001")
    front = mstack.fronts["aiohttp"]
    async with metrics_listener(service) as url:
        before, ledger_before = await scrape(url), ledger_by_kind(db)
        client = sdk(front, rich.key)
        await client.images.generate(model="flux", prompt=PROMPT, n=2, response_format="b64_json")
        await client.images.generate(model="flux", prompt=PROMPT, response_format="url")
        with pytest.raises(openai.APIStatusError) as e402:
            await sdk(front, poor.key).images.generate(model="flux", prompt=PROMPT)
        with pytest.raises(openai.AuthenticationError):
            await sdk(front, keys.new_key()).images.generate(model="flux", prompt=PROMPT)
        # Both attempts fail (max_attempts 2): a 502, and the route's breaker opens.
        fake.inject(Fault.SERVER_ERROR, Fault.SERVER_ERROR)
        with pytest.raises(openai.APIStatusError) as e502:
            await client.images.generate(model="flux", prompt=PROMPT)
        after, ledger_after = await scrape(url), ledger_by_kind(db)
    assert (e402.value.status_code, e502.value.status_code) == (402, 502)
    assert after.content_type.startswith("text/plain")

    def d(name: str, **labels: str) -> float:
        return delta(after, before, name, **labels)

    # Requests by RPC, model, status and reason; latency of each.
    assert d("imagegate_requests_total", **GEN, status="OK", reason="") == 2
    assert d("imagegate_requests_total", **GEN, status="FAILED_PRECONDITION") == 1
    assert d("imagegate_requests_total", reason="INSUFFICIENT_BALANCE") == 1
    assert d("imagegate_requests_total", status="UNAUTHENTICATED", reason="INVALID_API_KEY") == 1
    assert d("imagegate_requests_total", **GEN, status="UNAVAILABLE", reason="UPSTREAM_ERROR") == 1
    assert d("imagegate_request_duration_seconds_count", **GEN) == 4
    # Stages: auth for all five, reserve for the four past auth, upstream for the three
    # with money held, image files for the url one, settle or release for those three.
    stages = {"auth": 5, "reserve": 4, "upstream": 3, "store": 1, "settle": 3}
    for stage, count in stages.items():
        assert d("imagegate_stage_duration_seconds_count", stage=stage) == count, stage
    # Per upstream route: two good calls, two failed attempts; images made and delivered.
    route_ = {"provider": "compat", "upstream_model": "flux-schnell"}
    assert d("imagegate_upstream_calls_total", **route_, outcome="ok") == 2
    assert d("imagegate_upstream_calls_total", **route_, outcome="error") == 2
    assert d("imagegate_upstream_call_duration_seconds_count", **route_) == 4
    assert d("imagegate_upstream_images_total", **route_) == 3
    assert d("imagegate_images_generated_total", model="flux") == 3
    # Money: the counters are the ledger's movements.
    reserved = d("imagegate_reserved_micros_total", model="flux")
    settled = d("imagegate_settled_micros_total", model="flux")
    released = d("imagegate_released_micros_total", model="flux")
    moved = {k: ledger_after.get(k, 0) - ledger_before.get(k, 0) for k in ("reserve", "refund")}
    assert reserved == -moved["reserve"] == 4 * UNIT_PRICE  # 2 + 1 + 1 images quoted
    assert released == moved["refund"] == UNIT_PRICE
    assert settled == reserved - released == 3 * UNIT_PRICE
    assert after.value("imagegate_open_reservations") == held_count(db) == 0
    assert after.value("imagegate_oldest_open_reservation_age_seconds") == 0
    assert after.value("imagegate_breaker_state", **route_) == 2  # open
    assert after.value("imagegate_ready") == 1
    # gRPC server metrics from the interceptor.
    grpc_gen = {"grpc_service": "imagegate.v1.ImageService", "grpc_method": "GenerateImages"}
    assert d("grpc_server_started_total", **grpc_gen) == 5
    assert d("grpc_server_handled_total", **grpc_gen, grpc_code="OK") == 2
    assert d("grpc_server_handled_total", **grpc_gen, grpc_code="UNAVAILABLE") == 1
    assert d("grpc_server_handling_seconds_count", **grpc_gen) == 5
    # The front's own: by route, status and OpenAI error code.
    http = {"route": "/v1/images/generations", "method": "POST"}
    assert d("imagegate_http_requests_total", **http, status="200", code="") == 2
    assert d("imagegate_http_requests_total", **http, status="402", code="insufficient_quota") == 1
    assert d("imagegate_http_requests_total", **http, status="401", code="invalid_api_key") == 1
    assert d("imagegate_http_requests_total", **http, status="502", code="upstream_error") == 1
    assert d("imagegate_http_request_duration_seconds_count", **http) == 5


async def test_open_reservations_and_the_oldest_age_while_one_is_held(
    mstack: Stack, fake: FakeOpenAI
) -> None:
    service = mstack.service
    await asyncio.sleep(FAST_DISPATCH["breaker_cooldown_s"])  # the breaker lets a probe by
    tenant: Tenant = await make_tenant(service)
    fake.inject(Fault.STALL)  # answers after 2 s
    async with metrics_listener(service) as url:

        async def held() -> bool:
            return held_count(service.config.sqlite_path) > 0

        pending = asyncio.ensure_future(
            sdk(mstack.fronts["aiohttp"], tenant.key).images.generate(
                model="flux", prompt=PROMPT, response_format="b64_json"
            )
        )
        try:
            await poll(held, timeout_s=10)
            await asyncio.sleep(0.05)
            during = await scrape(url)
        finally:
            result = await pending
        after = await scrape(url)
    assert len(result.data) == 1
    assert during.value("imagegate_open_reservations") == 1
    assert during.value("imagegate_oldest_open_reservation_age_seconds") > 0
    assert after.value("imagegate_open_reservations") == 0


async def test_money_counters_follow_each_store_exactly_once(database_url: str) -> None:
    """SQLite and PostgreSQL alike: counted when committed, a second resolve counts nothing,
    and the sweep's releases count too."""
    clock = [1000.0]
    store = store_for(database_url, lambda: clock[0])
    await store.open(migrate=True)
    try:
        account = await store.create_account("m", 10_000)
        before = parse(generate_latest(REGISTRY).decode())
        charge = Charge("r", "k", "money-model", 1, "256x256", "standard")
        settled = await store.reserve(account.id, 3000, charge, 2000.0)
        released = await store.reserve(account.id, 2000, charge, 2000.0)
        await store.reserve(account.id, 1000, charge, 1500.0)  # expires first
        clock[0] = 1100.0
        assert await store.held() == (3, 1000.0)
        await store.settle(settled, 2500)
        await store.settle(settled, 2500)  # resolved once: not counted twice
        await store.release(released)
        await store.release(settled)
        assert await store.release_expired(1600.0) == 1
        after = parse(generate_latest(REGISTRY).decode())
        assert await store.held() == (0, None)
        assert await store.ledger_sum(account.id) == 10_000 - 2500
    finally:
        await store.close()
    model_ = {"model": "money-model"}
    assert delta(after, before, "imagegate_reserved_micros_total", **model_) == 6000
    assert delta(after, before, "imagegate_settled_micros_total", **model_) == 2500
    assert delta(after, before, "imagegate_released_micros_total", **model_) == 500 + 2000 + 1000


async def test_a_metrics_port_in_use_is_named() -> None:
    async with metrics_listener() as url:
        taken = url.removeprefix("http://").removesuffix("/metrics")
        with pytest.raises(OSError, match=f"cannot serve metrics on {taken}"):
            await start_admin(taken)


def test_admin_listener_address_parsing() -> None:
    from service.admin_http import parse_address

    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("off") is None
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("9464")


WORKER = textwrap.dedent(
    """
    import sys
    from service import metrics
    metrics.reserved("flux", int(sys.argv[1]))
    metrics.resolved("flux", int(sys.argv[1]), 1)
    metrics.ready(sys.argv[1] != "7")
    """
)


async def test_one_scrape_covers_every_process_in_multiprocess_mode() -> None:
    """As a supervisor of workers does: a private PROMETHEUS_MULTIPROC_DIR set before the
    workers start; its listener's one scrape sums what every worker wrote there."""
    with multiprocess_metrics() as directory:
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(directory)
        assert directory.stat().st_mode & 0o077 == 0
        for amount in ("5", "7"):
            await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", WORKER, amount], check=True, timeout=60
            )
        async with metrics_listener() as url:
            scraped = await scrape(url)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ and not directory.exists()
    assert scraped.value("imagegate_reserved_micros_total", model="flux") == 12
    assert scraped.value("imagegate_settled_micros_total", model="flux") == 2
    assert scraped.value("imagegate_released_micros_total", model="flux") == 10
    # Readiness of the least ready process (both ended: "live" gauges need mark_dead).
    assert scraped.value("imagegate_ready") == 0
