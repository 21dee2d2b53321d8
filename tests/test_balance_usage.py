"""GET /v1/balance and GET /v1/usage (GetBalance, ListUsage) over both fronts and gRPC:
the caller's own account only, the same bytes from each front."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from imagegate.v1 import images_pb2

from gateway import json_text
from service import cli
from tests.conftest import FRONTS, Stack, Tenant, make_tenant
from tests.fakes.base import Fault
from tests.limits_harness import BODY, PRICE, GatedOpenAI, grpc_stub, models, providers
from tests.providers_harness import FAST_DISPATCH, provider_stack
from tests.rest import Reply, assert_error, call

CREDIT = 1_000_000


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[GatedOpenAI]:
    fake = GatedOpenAI()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def ustack(
    tmp_path_factory: pytest.TempPathFactory, fake: GatedOpenAI
) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("usage"),
        providers=providers(fake),
        models=models(),
        dispatch=FAST_DISPATCH | {"breaker_failures": 1000},
    ) as stack:
        yield stack


@pytest.fixture(autouse=True)
def _open_gate(fake: GatedOpenAI) -> Iterator[None]:
    fake.faults.clear()
    fake.gate.set()
    yield
    fake.gate.set()


@pytest.fixture(params=FRONTS)
def url(request: pytest.FixtureRequest, ustack: Stack) -> str:
    return ustack.fronts[request.param]


@pytest.fixture
async def tenant(ustack: Stack) -> Tenant:
    return await make_tenant(ustack.service)


async def generate(url: str, tenant: Tenant, **fields: object) -> Reply:
    reply = await call(
        "POST", f"{url}/v1/images/generations", key=tenant.key, json_body=BODY | fields
    )
    return reply


async def get(url: str, path: str, tenant: Tenant) -> Reply:
    return await call("GET", f"{url}{path}", key=tenant.key)


async def test_balance_shape(url: str, tenant: Tenant) -> None:
    assert (await generate(url, tenant, n=2)).status == 200
    reply = await get(url, "/v1/balance", tenant)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    # int64 amounts print as strings in proto3 JSON; the USD strings are exact decimals.
    assert reply.json() == {
        "object": "balance",
        "currency": "usd",
        "balance_micros": str(CREDIT - 2 * PRICE),
        "held_micros": "0",
        "balance_usd": "0.998000",
        "held_usd": "0.000000",
    }


async def test_balance_shows_what_is_held(url: str, tenant: Tenant, fake: GatedOpenAI) -> None:
    fake.gate.clear()
    calls = len(fake.requests)
    running = asyncio.create_task(generate(url, tenant, n=3))
    await fake.wait_for_calls(calls + 1)
    during = (await get(url, "/v1/balance", tenant)).json()
    assert (during["balance_micros"], during["held_micros"]) == (
        str(CREDIT - 3 * PRICE),
        str(3 * PRICE),
    )
    fake.gate.set()
    assert (await running).status == 200
    after = (await get(url, "/v1/balance", tenant)).json()
    assert (after["balance_micros"], after["held_micros"]) == (str(CREDIT - 3 * PRICE), "0")


async def test_both_fronts_and_grpc_agree(ustack: Stack, tenant: Tenant) -> None:
    fronts = list(ustack.fronts.values())
    assert (await generate(fronts[0], tenant)).status == 200
    async with grpc_stub(ustack.grpc_target) as stub:
        auth = [("authorization", f"Bearer {tenant.key}")]
        balance = await stub.GetBalance(images_pb2.GetBalanceRequest(), metadata=auth)
        usage = await stub.ListUsage(images_pb2.ListUsageRequest(), metadata=auth)
    assert balance.balance_micros == CREDIT - PRICE
    for front in fronts:
        assert (await get(front, "/v1/balance", tenant)).body == json_text.message_json(balance)
        assert (await get(front, "/v1/usage", tenant)).body == json_text.message_json(usage)


def _record_keys() -> list[str]:
    return [f.name for f in images_pb2.UsageRecord.DESCRIPTOR.fields]


async def test_usage_records(url: str, ustack: Stack, tenant: Tenant, fake: GatedOpenAI) -> None:
    assert (await generate(url, tenant, n=2)).status == 200
    fake.inject(Fault.SERVER_ERROR, Fault.SERVER_ERROR)
    assert (await generate(url, tenant)).status == 502
    reply = await get(url, "/v1/usage", tenant)
    assert reply.status == 200
    body = reply.json()
    assert list(body) == ["object", "data", "has_more", "first_id", "last_id"]
    assert (body["object"], body["has_more"]) == ("list", False)
    failed, done = body["data"]  # newest first
    assert (body["first_id"], body["last_id"]) == (failed["id"], done["id"])
    for record in (failed, done):
        assert list(record) == _record_keys()
        assert record["object"] == "usage_record" and record["id"].startswith("res_")
        assert record["key_id"] == tenant.key_id
        assert (record["model"], record["size"], record["quality"]) == (
            "gen",
            "1024x1024",
            "standard",
        )
        assert isinstance(record["created"], int) and isinstance(record["latency_ms"], int)
        assert record["request_id"]
    assert (done["status"], done["cost_micros"], done["quoted_micros"], done["n"]) == (
        "settled",
        str(2 * PRICE),
        str(2 * PRICE),
        2,
    )
    assert done["route"] == "compat/gen"
    assert (failed["status"], failed["cost_micros"], failed["route"]) == ("released", "0", "")
    # Never a key or image bytes.
    assert tenant.key not in reply.body.decode() and "b64_json" not in reply.body.decode()


async def test_usage_pages(url: str, tenant: Tenant) -> None:
    for _ in range(5):
        assert (await generate(url, tenant)).status == 200
    everything = (await get(url, "/v1/usage", tenant)).json()["data"]
    ids = [r["id"] for r in everything]
    assert len(ids) == 5
    seen: list[str] = []
    after = ""
    while True:
        page = (await get(url, f"/v1/usage?limit=2&after={after}", tenant)).json()
        seen += [r["id"] for r in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids
    # The last of repeated parameters, on both fronts.
    twice = (await get(url, "/v1/usage?limit=50&limit=1", tenant)).json()
    assert [r["id"] for r in twice["data"]] == ids[:1] and twice["has_more"] is True


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("limit=-1", "limit"),
        ("after=res_nope", "after"),
    ],
)
async def test_bad_query_is_a_400(url: str, tenant: Tenant, query: str, param: str) -> None:
    reply = await get(url, f"/v1/usage?{query}", tenant)
    assert_error(reply, 400, "invalid_request_error", "invalid_value", param)


async def test_only_the_callers_own_account(url: str, ustack: Stack, tenant: Tenant) -> None:
    other = await make_tenant(ustack.service, credit_usd="3")
    assert (await generate(url, other)).status == 200
    theirs = (await get(url, "/v1/usage", other)).json()["data"][0]["id"]
    assert (await get(url, "/v1/usage", tenant)).json()["data"] == []
    # Another account's record is no cursor of yours.
    reply = await get(url, f"/v1/usage?after={theirs}", tenant)
    assert_error(reply, 400, "invalid_request_error", "invalid_value", "after")
    assert (await get(url, "/v1/balance", tenant)).json()["balance_micros"] == str(CREDIT)


@pytest.mark.parametrize("path", ["/v1/balance", "/v1/usage"])
async def test_key_required_and_get_only(url: str, path: str) -> None:
    reply = await call("GET", f"{url}{path}")
    assert_error(reply, 401, "invalid_request_error", "invalid_api_key")
    reply = await call("POST", f"{url}{path}", json_body={})
    assert_error(reply, 405, "invalid_request_error", "method_not_allowed")
    assert reply.headers["Allow"] == "GET"


async def test_cli_usage_reads_the_same_records(
    url: str, ustack: Stack, tenant: Tenant, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(3):
        assert (await generate(url, tenant)).status == 200
    api = (await get(url, "/v1/usage?limit=2", tenant)).json()
    data_dir = ustack.service.config.data_dir
    argv = ["usage", tenant.account, "--limit", "2", "--json", "--data-dir", str(data_dir)]
    assert await asyncio.to_thread(cli.main, argv) == 0
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == [r["id"] for r in api["data"]]
    assert all(r["key_id"] == tenant.key_id for r in rows)
    argv = [*argv[:2], "--after", api["last_id"], "--json", "--data-dir", str(data_dir)]
    assert await asyncio.to_thread(cli.main, argv) == 0
    older = json.loads(capsys.readouterr().out)
    assert len(older) == 1 and older[0]["id"] not in {r["id"] for r in rows}
