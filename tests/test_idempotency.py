"""Idempotency-Key over both REST fronts and gRPC: one upstream call and one charge per key.

A fake OpenAI-compatible upstream counts the calls and can hold them (its gate),
so a duplicate arrives while the first request is still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from imagegate.v1 import images_pb2

from gateway import json_text
from service.store.base import Store
from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant
from tests.fakes.base import Fault
from tests.limits_harness import (
    BODY,
    MODEL,
    PRICE,
    GatedOpenAI,
    dumps,
    grpc_stub,
    models,
    poll,
    providers,
    reservations,
)
from tests.providers_harness import FAST_DISPATCH, provider_stack
from tests.rest import Reply, assert_error, call

CREDIT = 1_000_000
REQUEST = images_pb2.GenerateImagesRequest(model=MODEL, prompt=BODY["prompt"], size=BODY["size"])


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[GatedOpenAI]:
    fake = GatedOpenAI()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def istack(
    tmp_path_factory: pytest.TempPathFactory, fake: GatedOpenAI
) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("idempotency"),
        providers=providers(fake),
        models=models(),
        dispatch=FAST_DISPATCH | {"breaker_failures": 1000},
    ) as stack:
        yield stack


@pytest.fixture(params=FRONTS)
def url(request: pytest.FixtureRequest, istack: Stack) -> str:
    return istack.fronts[request.param]


@pytest.fixture(autouse=True)
def _fresh_fake(fake: GatedOpenAI) -> Iterator[None]:
    fake.faults.clear()
    fake.gate.set()
    yield
    fake.gate.set()  # never leave a held call behind for the next test


@pytest.fixture
async def tenant(istack: Stack) -> Tenant:
    return await make_tenant(istack.service)


async def post(url: str, key: str, idem: str | None, body: object = BODY) -> Reply:
    headers = {} if idem is None else {"Idempotency-Key": idem}
    raw = body if isinstance(body, bytes) else dumps(body)  # type: ignore[arg-type]
    return await call(
        "POST",
        f"{url}/v1/images/generations",
        key=key,
        body=raw,
        headers={"Content-Type": "application/json", **headers},
    )


def metadata(tenant: Tenant, idem: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {tenant.key}"), ("idempotency-key", idem)]


async def test_same_key_five_times_in_a_row(
    url: str, istack: Stack, fake: GatedOpenAI, tenant: Tenant
) -> None:
    before = len(fake.requests)
    replies = [await post(url, tenant.key, "order-1") for _ in range(5)]
    assert [r.status for r in replies] == [200] * 5
    assert len({r.body for r in replies}) == 1  # byte for byte the first response
    assert len(fake.requests) - before == 1
    assert await balance(istack.service, tenant.account) == CREDIT - PRICE
    assert await reservations(istack.service.store, tenant.account) == ["settled"]
    # Without a key, the same body is a new request each time.
    again = await post(url, tenant.key, None)
    assert again.status == 200 and again.body != replies[0].body
    assert len(fake.requests) - before == 2


async def test_same_key_twenty_times_at_once(
    url: str, istack: Stack, fake: GatedOpenAI, tenant: Tenant
) -> None:
    before = len(fake.requests)
    fake.gate.clear()
    tasks = [asyncio.create_task(post(url, tenant.key, "burst")) for _ in range(20)]
    # The first has reached the upstream and is held there; the others are in flight too.
    await fake.wait_for_calls(before + 1)
    fake.gate.set()
    replies = await asyncio.gather(*tasks)
    assert [r.status for r in replies] == [200] * 20
    assert len({r.body for r in replies}) == 1
    assert len(fake.requests) - before == 1
    assert await balance(istack.service, tenant.account) == CREDIT - PRICE
    assert await reservations(istack.service.store, tenant.account) == ["settled"]


async def test_same_key_other_body_is_a_conflict(
    url: str, istack: Stack, fake: GatedOpenAI, tenant: Tenant
) -> None:
    first = await post(url, tenant.key, "k")
    assert first.status == 200
    before = len(fake.requests)
    for other in ({**BODY, "prompt": "another prompt"}, {**BODY, "n": 2}):
        reply = await post(url, tenant.key, "k", other)
        error = assert_error(reply, 409, "invalid_request_error", "idempotency_key_conflict")
        assert "Idempotency-Key" in error["message"]
    assert len(fake.requests) == before
    assert await balance(istack.service, tenant.account) == CREDIT - PRICE


async def test_body_compared_as_the_request_message_not_its_bytes(
    url: str, fake: GatedOpenAI, tenant: Tenant
) -> None:
    """Key order, spacing and unknown fields do not change the request: a replay."""
    first = await post(url, tenant.key, "same-request", BODY)
    before = len(fake.requests)
    reordered = dumps(dict(reversed(list(BODY.items()))) | {"unknown_field": 1}, indent=2)
    second = await post(url, tenant.key, "same-request", reordered)
    assert (second.status, second.body) == (200, first.body)
    assert len(fake.requests) == before


async def test_one_stored_response_for_both_fronts_and_grpc(
    istack: Stack, fake: GatedOpenAI, tenant: Tenant
) -> None:
    urls = list(istack.fronts.values())
    first = await post(urls[0], tenant.key, "everywhere")
    assert first.status == 200
    before = len(fake.requests)
    for url in urls:
        reply = await post(url, tenant.key, "everywhere")
        assert (reply.status, reply.body) == (200, first.body)
    async with grpc_stub(istack.grpc_target) as stub:
        message = await stub.GenerateImages(REQUEST, metadata=metadata(tenant, "everywhere"))
    # gRPC gets the stored message itself; the fronts print exactly it.
    assert json_text.message_json(message) == first.body
    assert len(fake.requests) == before
    # The replayed URL is the first response's: still signed and unexpired.
    image = await call("GET", first.json()["data"][0]["url"])
    assert image.status == 200 and image.headers["Content-Type"] == "image/png"
    assert await balance(istack.service, tenant.account) == CREDIT - PRICE


@pytest.mark.parametrize(
    "bad", ["x" * 256, "has space", 'quote"d', "semi;colon", "comma,key", "what?"]
)
async def test_malformed_key_is_a_400(
    url: str, fake: GatedOpenAI, tenant: Tenant, bad: str
) -> None:
    before = len(fake.requests)
    reply = await post(url, tenant.key, bad)
    assert_error(reply, 400, "invalid_request_error", "invalid_value", "Idempotency-Key")
    assert len(fake.requests) == before


async def test_longest_key_is_accepted(url: str, tenant: Tenant) -> None:
    key = "K-" + "a1._:~+/=@-" * 22 + "z" * 11
    assert len(key) == 255
    assert (await post(url, tenant.key, key)).status == 200


async def test_stored_errors_replay_and_validation_errors_do_not(
    url: str, istack: Stack, fake: GatedOpenAI
) -> None:
    poor = await make_tenant(istack.service, credit_usd="0.0005")  # under one image
    refused = await post(url, poor.key, "pay")
    assert_error(refused, 402, "insufficient_quota", "insufficient_quota")
    await istack.service.store.add_credit(poor.account, CREDIT)
    # Reached execution, so stored (as Stripe stores a declined charge): the same 402.
    replayed = await post(url, poor.key, "pay")
    assert (replayed.status, replayed.body) == (402, refused.body)
    assert (await post(url, poor.key, "pay-again")).status == 200

    # Refused before execution (a bad size): not stored, the key stays free.
    tenant = await make_tenant(istack.service)
    bad = await post(url, tenant.key, "fix-me", {**BODY, "size": "7x7"})
    assert_error(bad, 400, "invalid_request_error", "invalid_value", "size")
    assert (await post(url, tenant.key, "fix-me")).status == 200


async def test_upstream_failure_is_stored_and_replayed(
    url: str, istack: Stack, fake: GatedOpenAI, tenant: Tenant
) -> None:
    fake.inject(Fault.SERVER_ERROR, Fault.SERVER_ERROR)  # both attempts of the route
    failed = await post(url, tenant.key, "flaky")
    assert_error(failed, 502, "upstream_error", "upstream_error")
    calls = len(fake.requests)
    replayed = await post(url, tenant.key, "flaky")
    assert (replayed.status, replayed.body) == (502, failed.body)
    assert len(fake.requests) == calls
    assert await balance(istack.service, tenant.account) == CREDIT
    assert await reservations(istack.service.store, tenant.account) == ["released"]


async def test_keys_are_scoped_per_account(url: str, istack: Stack, fake: GatedOpenAI) -> None:
    one, two = await make_tenant(istack.service), await make_tenant(istack.service)
    before = len(fake.requests)
    a, b = await post(url, one.key, "shared-key"), await post(url, two.key, "shared-key")
    assert (a.status, b.status) == (200, 200) and a.body != b.body
    assert len(fake.requests) - before == 2
    for t in (one, two):
        assert await balance(istack.service, t.account) == CREDIT - PRICE


async def _claim_gone(store: Store, account_id: int, key: str) -> None:
    async def gone() -> bool:
        return await store.get_idempotency(account_id, key) is None

    await poll(gone)


async def test_in_flight_duplicate_waits_or_aborts_at_its_deadline(
    istack: Stack, fake: GatedOpenAI, tenant: Tenant
) -> None:
    async with grpc_stub(istack.grpc_target) as stub:
        fake.gate.clear()
        before = len(fake.requests)
        first = stub.GenerateImages(REQUEST, metadata=metadata(tenant, "slow"))
        await fake.wait_for_calls(before + 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImages(REQUEST, metadata=metadata(tenant, "slow"), timeout=1.0)
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert caught.value.trailing_metadata()["imagegate-reason"] == "IDEMPOTENCY_CONFLICT"
        waiting = stub.GenerateImages(REQUEST, metadata=metadata(tenant, "slow"))
        fake.gate.set()
        assert await waiting == await first
    assert len(fake.requests) - before == 1
    assert await balance(istack.service, tenant.account) == CREDIT - PRICE


async def test_cancelled_request_frees_its_key(
    istack: Stack, fake: GatedOpenAI, tenant: Tenant
) -> None:
    store = istack.service.store
    async with grpc_stub(istack.grpc_target) as stub:
        fake.gate.clear()
        before = len(fake.requests)
        gone = stub.GenerateImages(REQUEST, metadata=metadata(tenant, "retry-me"))
        await fake.wait_for_calls(before + 1)
        gone.cancel()  # the client hangs up: no outcome, nothing stored, nothing charged
        await _claim_gone(store, tenant.account_id, "retry-me")
        fake.gate.set()
        reply = await stub.GenerateImages(REQUEST, metadata=metadata(tenant, "retry-me"))
    assert len(reply.data) == 1
    assert len(fake.requests) - before == 2
    assert await balance(istack.service, tenant.account) == CREDIT - PRICE
    assert await reservations(store, tenant.account) == ["settled", "released"]
