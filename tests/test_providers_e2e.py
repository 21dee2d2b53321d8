"""Routes end to end through both fronts, on the provider harness: the local kind under a
declared provider id, routes to dead providers dropped, failover, the breaker, no failover
on a safety refusal, partial success, and the balance after each."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import grpc
import openai
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc

from service.store.base import UsageRow
from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk
from tests.fakes.scripted import OK, ScriptedProvider, fail, refuse
from tests.providers_harness import FAKE_ENV, FAST_DISPATCH, model, provider, provider_stack, route
from tests.rest import assert_error, call

SCRIPTED = {"openai_compatible": "tests.fakes.scripted"}
CREDIT = 1_000_000


def _per_front(name: str, *routes: dict[str, object]) -> dict[str, dict[str, object]]:
    """One model per front, so each front's run has breakers of its own."""
    return {f"{name}-{front}": model(*routes) for front in FRONTS}


def _models() -> dict[str, dict[str, object]]:
    models = {
        "routed-local": model(route("offline", "local"), family="local"),
        "dead-first": model(route("nokey", "gpt-image-1"), route("offline", "local")),
        "all-dead": model(route("nokey", "gpt-image-1")),
        "deadline": model(route("primary", "up-deadline"), route("backup", "b")),
    }
    for front in FRONTS:
        models |= {
            f"flaky-{front}": model(route("primary", f"up-flaky-{front}"), route("backup", "b")),
            f"breaker-{front}": model(
                route("primary", f"up-breaker-{front}"), route("backup", "b")
            ),
            f"policy-{front}": model(route("primary", f"up-policy-{front}"), route("backup", "b")),
            f"single-{front}": model(route("primary", f"up-single-{front}", max_n=1)),
        }
    return models


@pytest.fixture(scope="module")
async def pstack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("providers"),
        providers={
            "offline": provider("local"),
            "primary": provider("openai_compatible"),
            "backup": provider("openai_compatible"),
            "nokey": provider("openai_compatible", api_key_env="IMAGEGATE_TEST_UNSET_KEY"),
        },
        models=_models(),
        dispatch=FAST_DISPATCH,
        kind_modules=SCRIPTED,
        # Only the scripted providers' key: the shipped providers (openai, ...) stay dead
        # now that their adapters exist, so only this module's models are served.
        env={"SCRIPTED_API_KEY": FAKE_ENV["SCRIPTED_API_KEY"]},
    ) as stack:
        yield stack


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def who(pstack: Stack) -> Tenant:
    return await make_tenant(pstack.service)


def scripted(stack: Stack, provider_id: str) -> ScriptedProvider:
    adapter = stack.service.registry.providers[provider_id]
    assert isinstance(adapter, ScriptedProvider)
    return adapter


@pytest.fixture
def primary(pstack: Stack) -> ScriptedProvider:
    adapter = scripted(pstack, "primary")
    adapter.script.clear()
    adapter.default = OK
    return adapter


def calls_to(adapter: ScriptedProvider, upstream_model: str) -> int:
    return sum(1 for c in adapter.calls if c.upstream_model == upstream_model)


async def last_usage(stack: Stack, tenant: Tenant) -> UsageRow:
    return (await stack.service.store.usage(tenant.account, 1))[0]


async def test_local_kind_through_a_declared_provider_id(
    pstack: Stack, front: str, who: Tenant
) -> None:
    client = sdk(pstack.fronts[front], who.key)
    result = await client.images.generate(
        model="routed-local", prompt="a red kite", n=2, size="256x256", response_format="b64_json"
    )
    assert len(result.data) == 2
    assert all(base64.b64decode(d.b64_json or "")[:4] == b"\x89PNG" for d in result.data)
    urls = await client.images.generate(model="routed-local", prompt="a red kite", size="256x256")
    assert urls.data[0].url and (await call("GET", urls.data[0].url)).status == 200
    assert await balance(pstack.service, who.account) == CREDIT - 3 * 1000
    row = await last_usage(pstack, who)
    assert (row.provider, row.upstream_model, row.upstream_cost_micros) == (
        "offline",
        "local",
        1000,
    )


async def test_dead_routes_are_dropped_and_dead_models_unlisted(
    pstack: Stack, front: str, who: Tenant
) -> None:
    client = sdk(pstack.fronts[front], who.key)
    ids = {m.id for m in (await client.models.list()).data}
    assert {"routed-local", "dead-first"} <= ids
    assert "all-dead" not in ids and "dall-e-3" not in ids  # no credentials for the shipped ones
    await client.images.generate(model="dead-first", prompt="p", size="256x256")
    assert (await last_usage(pstack, who)).provider == "offline"
    reply = await call(
        "POST",
        f"{pstack.fronts[front]}/v1/images/generations",
        key=who.key,
        json_body={"model": "all-dead", "prompt": "p"},
    )
    assert_error(reply, 400, "invalid_request_error", "model_not_found", "model")


async def test_failover_to_the_second_route_charges_once(
    pstack: Stack, front: str, who: Tenant, primary: ScriptedProvider
) -> None:
    backup = scripted(pstack, "backup")
    before = len(backup.calls)
    primary.then(fail(), fail())  # both attempts on the first route
    result = await sdk(pstack.fronts[front], who.key).images.generate(
        model=f"flaky-{front}", prompt="p", size="256x256", response_format="b64_json"
    )
    assert result.data[0].revised_prompt == "drawn by backup"
    assert calls_to(primary, f"up-flaky-{front}") == 2 and len(backup.calls) == before + 1
    assert await balance(pstack.service, who.account) == CREDIT - 1000
    row = await last_usage(pstack, who)
    assert (row.status, row.cost_micros, row.provider) == ("settled", 1000, "backup")


async def test_breaker_opens_skips_and_probes_again(
    pstack: Stack, front: str, who: Tenant, primary: ScriptedProvider
) -> None:
    client = sdk(pstack.fronts[front], who.key)
    upstream = f"up-breaker-{front}"
    primary.default = fail(retryable=False)

    async def served_by() -> str:
        result = await client.images.generate(
            model=f"breaker-{front}", prompt="p", size="256x256", response_format="b64_json"
        )
        return result.data[0].revised_prompt or ""

    # breaker_failures = 2: two failed calls open it, each request still served by backup.
    assert [await served_by(), await served_by()] == ["drawn by backup"] * 2
    assert calls_to(primary, upstream) == 2
    health = {(h.provider, h.upstream_model): h for h in pstack.service.core.dispatcher.health()}
    assert health["primary", upstream].state == "open"
    # Open: skipped without a call.
    assert await served_by() == "drawn by backup"
    assert calls_to(primary, upstream) == 2
    # After the cooldown one probe goes through, succeeds, and closes it.
    await asyncio.sleep(FAST_DISPATCH["breaker_cooldown_s"] + 0.1)
    primary.default = OK
    assert await served_by() == "drawn by primary"
    assert calls_to(primary, upstream) == 3
    assert await balance(pstack.service, who.account) == CREDIT - 4 * 1000


async def test_no_failover_on_a_safety_refusal(
    pstack: Stack, front: str, who: Tenant, primary: ScriptedProvider
) -> None:
    backup = scripted(pstack, "backup")
    before = len(backup.calls)
    primary.then(refuse())
    reply = await call(
        "POST",
        f"{pstack.fronts[front]}/v1/images/generations",
        key=who.key,
        json_body={"model": f"policy-{front}", "prompt": "p", "size": "256x256"},
    )
    assert_error(reply, 400, "invalid_request_error", "content_policy_violation")
    assert calls_to(primary, f"up-policy-{front}") == 1 and len(backup.calls) == before
    assert await balance(pstack.service, who.account) == CREDIT
    assert (await last_usage(pstack, who)).status == "released"


async def test_partial_success_is_charged_for_the_delivered_images(
    pstack: Stack, front: str, who: Tenant, primary: ScriptedProvider
) -> None:
    # n=3 on a one-per-call route: three parallel calls, the second fails for good.
    primary.then(OK, fail(retryable=False), OK)
    result = await sdk(pstack.fronts[front], who.key).images.generate(
        model=f"single-{front}", prompt="p", n=3, size="256x256", response_format="b64_json"
    )
    assert len(result.data) == 2
    assert await balance(pstack.service, who.account) == CREDIT - 2 * 1000
    row = await last_usage(pstack, who)
    assert (row.n, row.cost_micros, row.status) == (3, 2000, "settled")


async def test_every_route_failing_is_a_502_and_free(
    pstack: Stack, front: str, who: Tenant, primary: ScriptedProvider
) -> None:
    primary.then(fail(retryable=False))
    with pytest.raises(openai.InternalServerError) as raised:
        await sdk(pstack.fronts[front], who.key).images.generate(
            model=f"single-{front}", prompt="p", size="256x256"
        )
    assert raised.value.status_code == 502
    body = raised.value.body
    assert isinstance(body, dict) and body["code"] == "upstream_error"
    assert "'primary'" in body["message"]
    assert not any(secret in str(body) for secret in FAKE_ENV.values())
    assert await balance(pstack.service, who.account) == CREDIT


async def test_the_grpc_deadline_reaches_the_dispatcher(
    pstack: Stack, who: Tenant, primary: ScriptedProvider
) -> None:
    # A Retry-After longer than the caller's deadline: fail over at once instead of
    # waiting (which only the caller's deadline, passed down, can tell).
    primary.then(fail(retry_after_s=3.0))
    async with grpc.aio.insecure_channel(pstack.grpc_target) as channel:
        reply = await images_pb2_grpc.ImageServiceStub(channel).GenerateImages(
            images_pb2.GenerateImagesRequest(
                model="deadline", prompt="p", size="256x256", response_format="b64_json"
            ),
            metadata=(("authorization", f"Bearer {who.key}"),),
            timeout=2.0,
        )
    assert reply.data[0].revised_prompt == "drawn by backup"
    assert calls_to(primary, "up-deadline") == 1
