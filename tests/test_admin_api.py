"""The admin API (AdminService) and an account key's own keys and daily usage, over gRPC
and both REST fronts: every operation, its errors, and who may call it."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import openai
import pytest
from imagegate.v1 import accounts_pb2, admin_pb2, admin_pb2_grpc, images_pb2

from gateway import json_text
from service.admin import Admin
from service.server import message_size_options
from tests.conftest import FRONTS, Stack, Tenant, make_tenant, sdk
from tests.fakes.base import Fault
from tests.limits_harness import BODY, MODEL, PRICE, GatedOpenAI, grpc_stub
from tests.providers_harness import FAST_DISPATCH, model, provider, provider_stack, route
from tests.rest import Reply, assert_error, call
from tests.test_grpc import _reason

FLAKY = "flaky"
_names = itertools.count()


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[GatedOpenAI]:
    fake = GatedOpenAI()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def broken() -> AsyncIterator[GatedOpenAI]:
    """The upstream of the `flaky` model's one route: fails whenever a test says so."""
    broken = GatedOpenAI()
    await broken.start()
    yield broken
    await broken.stop()


@pytest.fixture(scope="module")
async def astack(
    tmp_path_factory: pytest.TempPathFactory, fake: GatedOpenAI, broken: GatedOpenAI
) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("admin"),
        providers={
            "compat": provider("openai_compatible", fake.openai_base, max_n=10),
            "broken": provider("openai_compatible", broken.openai_base, max_n=10),
        },
        models={MODEL: model(route("compat", MODEL)), FLAKY: model(route("broken", MODEL))},
        # Retries would hide nothing here: one attempt per route, the breaker at 2.
        dispatch=FAST_DISPATCH | {"max_attempts": 1, "breaker_cooldown_s": 600},
    ) as stack:
        yield stack


@pytest.fixture(params=FRONTS)
def url(request: pytest.FixtureRequest, astack: Stack) -> str:
    return astack.fronts[request.param]


@pytest.fixture(scope="module")
async def admin_key(astack: Stack) -> str:
    key, _ = await Admin(astack.service.store).create_admin_key("tests")
    return key


@pytest.fixture
async def tenant(astack: Stack) -> Tenant:
    return await make_tenant(astack.service)


def fresh_name() -> str:
    return f"adm{next(_names)}x"


async def admin(method: str, url: str, path: str, key: str | None, body: object = None) -> Reply:
    return await call(method, f"{url}{path}", key=key, json_body=body)


# Every admin operation with a valid request (the account, key ids are real or not:
# the credential is checked first).
OPERATIONS: list[tuple[str, str, Any]] = [
    ("POST", "/admin/v1/accounts", {"name": "never-made", "credit_usd": "1"}),
    ("GET", "/admin/v1/accounts", None),
    ("GET", "/admin/v1/accounts/someone", None),
    ("POST", "/admin/v1/accounts/someone/credit", {"amount_usd": "1"}),
    ("POST", "/admin/v1/keys", {"account": "someone", "name": "ci"}),
    ("GET", "/admin/v1/keys?account=someone", None),
    ("PATCH", "/admin/v1/keys/key_0123456789abcdef", {"models": [MODEL]}),
    ("DELETE", "/admin/v1/keys/key_0123456789abcdef", None),
    ("GET", "/admin/v1/usage?days=7", None),
    ("GET", "/admin/v1/requests?limit=5", None),
    ("GET", "/admin/v1/models", None),
]


@pytest.mark.parametrize(("method", "path", "body"), OPERATIONS)
async def test_each_operation_needs_an_admin_key(
    url: str, tenant: Tenant, admin_key: str, method: str, path: str, body: object
) -> None:
    refused = await admin(method, url, path, tenant.key, body)
    error = assert_error(refused, 403, "invalid_request_error", "admin_required")
    assert tenant.key not in error["message"]
    assert_error(
        await admin(method, url, path, None, body), 401, "invalid_request_error", "invalid_api_key"
    )
    unknown = "sk-admin-" + "A" * 43
    assert_error(
        await admin(method, url, path, unknown, body),
        401,
        "invalid_request_error",
        "invalid_api_key",
    )
    # Nothing was made by the refused calls.
    listed = (await admin("GET", url, "/admin/v1/accounts", admin_key)).json()["data"]
    assert "never-made" not in {a["name"] for a in listed}


async def test_revoked_keys_get_401(url: str, astack: Stack, tenant: Tenant) -> None:
    store_admin = Admin(astack.service.store)
    key, record = await store_admin.create_admin_key("short-lived")
    assert (await admin("GET", url, "/admin/v1/models", key)).status == 200
    await store_admin.revoke_admin_key(record.id)
    assert_error(
        await admin("GET", url, "/admin/v1/models", key),
        401,
        "invalid_request_error",
        "invalid_api_key",
    )
    await store_admin.revoke_key(tenant.key_id)
    assert_error(
        await admin("GET", url, "/admin/v1/models", tenant.key),
        401,
        "invalid_request_error",
        "invalid_api_key",
    )


async def test_an_admin_key_cannot_spend(url: str, admin_key: str) -> None:
    for method, path, body in (
        ("POST", "/v1/images/generations", BODY),
        ("GET", "/v1/models", None),
        ("GET", "/v1/balance", None),
        ("GET", "/v1/keys", None),
    ):
        reply = await admin(method, url, path, admin_key, body)
        error = assert_error(reply, 401, "invalid_request_error", "invalid_api_key")
        assert admin_key not in error["message"]


async def test_accounts_create_list_show_credit(url: str, admin_key: str) -> None:
    name = fresh_name()
    created = await admin(
        "POST", url, "/admin/v1/accounts", admin_key, {"name": name, "credit_usd": "10"}
    )
    assert created.status == 200
    account = created.json()
    assert list(account) == ["name", "balance_micros", "held_micros", "created"]
    assert (account["name"], account["balance_micros"], account["held_micros"]) == (
        name,
        "10000000",
        "0",
    )
    again = await admin("POST", url, "/admin/v1/accounts", admin_key, {"name": name})
    assert_error(again, 409, "invalid_request_error", "account_exists", "name")

    listed = await admin("GET", url, "/admin/v1/accounts", admin_key)
    assert listed.json()["object"] == "list"
    assert account in listed.json()["data"]

    credited = await admin(
        "POST",
        url,
        f"/admin/v1/accounts/{name}/credit",
        admin_key,
        {"amount_usd": "2.50", "note": "top-up"},
    )
    assert credited.json()["balance_micros"] == "12500000"
    shown = (await admin("GET", url, f"/admin/v1/accounts/{name}", admin_key)).json()
    assert shown["account"] == credited.json()
    ledger = shown["ledger"]
    assert [(e["kind"], e["amount_micros"], e["balance_micros"], e["note"]) for e in ledger] == [
        ("credit", "2500000", "12500000", "top-up"),
        ("credit", "10000000", "10000000", "initial credit"),
    ]
    assert sum(int(e["amount_micros"]) for e in ledger) == 12_500_000


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/admin/v1/accounts/{name}/credit", {"amount_usd": "-1"}, "amount_usd"),
        ("/admin/v1/accounts/{name}/credit", {"amount_usd": "0"}, "amount_usd"),
        ("/admin/v1/accounts/{name}/credit", {"amount_usd": "lots"}, "amount_usd"),
        ("/admin/v1/accounts/{name}/credit", {}, "amount_usd"),
        ("/admin/v1/accounts", {"name": "ok-name", "credit_usd": "1.0000001"}, "credit_usd"),
        ("/admin/v1/accounts", {"name": "has/slash"}, "name"),
        ("/admin/v1/accounts", {"name": ""}, "name"),
    ],
)
async def test_bad_amounts_and_names_are_400(
    url: str, admin_key: str, tenant: Tenant, path: str, body: dict[str, str], param: str
) -> None:
    reply = await admin("POST", url, path.format(name=tenant.account), admin_key, body)
    code = "missing_required_parameter" if body.get("name") == "" else "invalid_value"
    assert_error(reply, 400, "invalid_request_error", code, param)


async def test_unknown_account_is_404(url: str, admin_key: str) -> None:
    for method, path, body in (
        ("GET", "/admin/v1/accounts/nobody", None),
        ("POST", "/admin/v1/accounts/nobody/credit", {"amount_usd": "1"}),
        ("POST", "/admin/v1/keys", {"account": "nobody"}),
        ("GET", "/admin/v1/keys?account=nobody", None),
        ("GET", "/admin/v1/usage?account=nobody", None),
        ("GET", "/admin/v1/requests?account=nobody", None),
    ):
        reply = await admin(method, url, path, admin_key, body)
        assert_error(reply, 404, "invalid_request_error", "account_not_found", "account")


async def test_unknown_key_is_404(url: str, admin_key: str) -> None:
    for method, body in (("PATCH", {"limits": {"rpm": 5}}), ("DELETE", None)):
        reply = await admin(method, url, "/admin/v1/keys/key_nope", admin_key, body)
        assert_error(reply, 404, "invalid_request_error", "key_not_found", "key_id")


async def test_keys_create_update_revoke_with_the_sdk(
    url: str, admin_key: str, tenant: Tenant, astack: Stack
) -> None:
    created = await admin(
        "POST",
        url,
        "/admin/v1/keys",
        admin_key,
        {
            "account": tenant.account,
            "name": "ci",
            "models": [MODEL],
            "limits": {"rpm": 100, "max_n": 2},
        },
    )
    assert created.status == 200, created.body
    body = created.json()
    key, info = body["key"], body["info"]
    assert key.startswith("sk-") and len(key) == 46
    assert info["prefix"] == key[:7] + "..." + key[-4:]
    assert (info["account"], info["name"], info["models"], info["revoked"]) == (
        tenant.account,
        "ci",
        [MODEL],
        False,
    )
    assert info["limits"] == {"rpm": 100, "max_n": 2}
    assert info["last_used"] == 0

    client = sdk(url, key)
    image = await client.images.generate(model=MODEL, prompt="a kite", size="1024x1024")
    assert image.data
    listed = (
        await admin("GET", url, f"/admin/v1/keys?account={tenant.account}", admin_key)
    ).json()["data"]
    mine = next(k for k in listed if k["id"] == info["id"])
    assert mine["last_used"] >= info["created"] > 0
    assert key not in json_text.dumps(listed).decode()

    patched = await admin(
        "PATCH",
        url,
        f"/admin/v1/keys/{info['id']}",
        admin_key,
        {"models": [FLAKY], "limits": {"rpm": -1, "ipm": 0}},
    )
    assert patched.status == 200, patched.body
    assert (patched.json()["models"], patched.json()["limits"]) == ([FLAKY], {"ipm": 0, "max_n": 2})
    with pytest.raises(openai.PermissionDeniedError):
        await client.images.generate(model=MODEL, prompt="a kite", size="1024x1024")
    # Limits alone leave the models as they are.
    limited = await admin(
        "PATCH", url, f"/admin/v1/keys/{info['id']}", admin_key, {"limits": {"max_n": 3}}
    )
    assert limited.json()["models"] == [FLAKY]
    everything = await admin(
        "PATCH", url, f"/admin/v1/keys/{info['id']}", admin_key, {"models": []}
    )
    assert everything.json()["models"] == []
    await client.images.generate(model=MODEL, prompt="a kite", size="1024x1024")

    revoked = await admin("DELETE", url, f"/admin/v1/keys/{info['id']}", admin_key)
    assert revoked.json()["revoked"] is True
    with pytest.raises(openai.AuthenticationError):
        await client.images.generate(model=MODEL, prompt="a kite", size="1024x1024")
    with pytest.raises(openai.AuthenticationError):
        await client.models.list()


@pytest.mark.parametrize(
    "body",
    [{"limits": {"rpm": -2}}, {"models": [1]}, {"limits": {"concurrency": -5}}],
)
async def test_bad_key_changes_are_400(
    url: str, admin_key: str, tenant: Tenant, body: dict[str, Any]
) -> None:
    reply = await admin("PATCH", url, f"/admin/v1/keys/{tenant.key_id}", admin_key, body)
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "invalid_value"


async def test_usage_by_day_and_requests(
    url: str, admin_key: str, tenant: Tenant, fake: GatedOpenAI
) -> None:
    client = sdk(url, tenant.key)
    await client.images.generate(model=MODEL, prompt="a kite", size="1024x1024", n=2)
    await client.images.generate(model=MODEL, prompt="a kite", size="1024x1024")
    usage = await admin("GET", url, f"/admin/v1/usage?account={tenant.account}&days=1", admin_key)
    assert usage.status == 200
    [bucket] = usage.json()["data"]
    assert list(bucket) == ["day", "model", "key_id", "route", "requests", "images", "spend_micros"]
    assert (bucket["model"], bucket["key_id"], bucket["route"]) == (
        MODEL,
        tenant.key_id,
        f"compat/{MODEL}",
    )
    assert (bucket["requests"], bucket["images"], bucket["spend_micros"]) == (2, 3, str(3 * PRICE))
    everyone = (await admin("GET", url, "/admin/v1/usage", admin_key)).json()["data"]
    assert bucket in everyone

    page = await admin(
        "GET", url, f"/admin/v1/requests?account={tenant.account}&limit=1", admin_key
    )
    first = page.json()
    assert (first["object"], first["has_more"], len(first["data"])) == ("list", True, 1)
    record = first["data"][0]
    assert (record["account"], record["n"], record["cost_micros"], record["status"]) == (
        tenant.account,
        1,
        str(PRICE),
        "settled",
    )
    rest = (
        await admin(
            "GET",
            url,
            f"/admin/v1/requests?account={tenant.account}&after={first['last_id']}",
            admin_key,
        )
    ).json()
    assert [r["n"] for r in rest["data"]] == [2] and rest["has_more"] is False
    across = (await admin("GET", url, "/admin/v1/requests?limit=100", admin_key)).json()
    assert record["id"] in {r["id"] for r in across["data"]}

    for path, param in (
        ("/admin/v1/usage?days=0", "days"),
        ("/admin/v1/usage?days=abc", "days"),
        ("/admin/v1/requests?limit=1000", "limit"),
        ("/admin/v1/requests?after=res_bogus", "after"),
    ):
        reply = await admin("GET", url, path, admin_key)
        assert_error(reply, 400, "invalid_request_error", "invalid_value", param)


async def test_models_show_an_open_breaker(
    url: str, admin_key: str, tenant: Tenant, broken: GatedOpenAI
) -> None:
    broken.inject(Fault.SERVER_ERROR, Fault.SERVER_ERROR)
    client = sdk(url, tenant.key)
    for _ in range(2):
        with pytest.raises(openai.APIStatusError):
            await client.images.generate(model=FLAKY, prompt="a kite", size="1024x1024")
    reply = await admin("GET", url, "/admin/v1/models", admin_key)
    assert reply.status == 200
    models = {m["id"]: m for m in reply.json()["data"]}
    flaky, good = models[FLAKY], models[MODEL]
    assert flaky["routes"] == [
        {
            "provider": "broken",
            "kind": "openai_compatible",
            "upstream_model": MODEL,
            "live": True,
            "breaker": "open",
            "missing": "",
        }
    ]
    assert good["routes"][0]["breaker"] == "closed"
    assert {"size": "1024x1024", "quality": "standard", "micros": str(PRICE)} in good["prices"]
    # The shipped catalog's models are listed too, not live without credentials.
    assert any(not r["live"] for m in models.values() for r in m["routes"])


async def test_fronts_and_grpc_answer_the_same(
    astack: Stack, admin_key: str, tenant: Tenant
) -> None:
    auth = [("authorization", f"Bearer {admin_key}")]
    channel = grpc.aio.insecure_channel(
        astack.grpc_target, options=message_size_options(64 * 1024 * 1024)
    )
    try:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        account = await stub.GetAccount(
            admin_pb2.GetAccountRequest(account=tenant.account), metadata=auth
        )
        keys = await stub.ListKeys(admin_pb2.ListKeysRequest(account=tenant.account), metadata=auth)
    finally:
        await channel.close()
    assert account.account.balance_micros == 1_000_000
    assert [k.id for k in keys.data] == [tenant.key_id]
    for front in astack.fronts.values():
        shown = await admin("GET", front, f"/admin/v1/accounts/{tenant.account}", admin_key)
        assert shown.body == json_text.message_json(account)
        listed = await admin("GET", front, f"/admin/v1/keys?account={tenant.account}", admin_key)
        assert listed.body == json_text.message_json(keys)


async def test_every_operation_over_grpc(astack: Stack, admin_key: str, tenant: Tenant) -> None:
    admin_auth = [("authorization", f"Bearer {admin_key}")]
    account_auth = [("authorization", f"Bearer {tenant.key}")]
    name = fresh_name()
    channel = grpc.aio.insecure_channel(astack.grpc_target)
    try:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        calls: list[tuple[Any, Any]] = [
            (stub.CreateAccount, admin_pb2.CreateAccountRequest(name=name, credit_usd="3")),
            (stub.ListAccounts, admin_pb2.ListAccountsRequest()),
            (stub.GetAccount, admin_pb2.GetAccountRequest(account=name)),
            (
                stub.CreditAccount,
                admin_pb2.CreditAccountRequest(
                    account=name, credit=admin_pb2.Credit(amount_usd="1")
                ),
            ),
            (stub.CreateKey, admin_pb2.CreateKeyRequest(account=name, name="g")),
            (stub.ListKeys, admin_pb2.ListKeysRequest(account=name)),
            (stub.GetUsage, admin_pb2.GetUsageRequest(days="2")),
            (stub.ListRequests, admin_pb2.ListRequestsRequest(limit="3")),
            (stub.ListModelRoutes, admin_pb2.ListModelRoutesRequest()),
        ]
        for rpc, request in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await rpc(request, metadata=account_auth)
            code, reason, _ = _reason(refused.value)
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await rpc(request)
            assert _reason(anonymous.value)[:2] == (
                grpc.StatusCode.UNAUTHENTICATED,
                "INVALID_API_KEY",
            )
            await rpc(request, metadata=admin_auth)
        shown = await stub.GetAccount(
            admin_pb2.GetAccountRequest(account=name), metadata=admin_auth
        )
        assert shown.account.balance_micros == 4_000_000
        created = (
            await stub.ListKeys(admin_pb2.ListKeysRequest(account=name), metadata=admin_auth)
        ).data[0]
        update = admin_pb2.UpdateKeyRequest(
            key_id=created.id,
            update=admin_pb2.KeyUpdate(limits=accounts_pb2.KeyLimits(rpm=7)),
        )
        update.update.models.append(MODEL)
        updated = await stub.UpdateKey(update, metadata=admin_auth)
        assert (list(updated.models), updated.limits.rpm) == ([MODEL], 7)
        revoked = await stub.RevokeKey(
            admin_pb2.RevokeKeyRequest(key_id=created.id), metadata=admin_auth
        )
        assert revoked.revoked
        for rpc, request in (
            (stub.UpdateKey, update),
            (stub.RevokeKey, admin_pb2.RevokeKeyRequest(key_id=created.id)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await rpc(request, metadata=account_auth)
            assert _reason(refused.value)[1] == "ADMIN_REQUIRED"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetAccount(
                admin_pb2.GetAccountRequest(account="nobody"), metadata=admin_auth
            )
        assert _reason(missing.value) == (
            grpc.StatusCode.NOT_FOUND,
            "ACCOUNT_NOT_FOUND",
            {"param": "account"},
        )
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            await stub.CreateAccount(admin_pb2.CreateAccountRequest(name=name), metadata=admin_auth)
        assert _reason(taken.value)[:2] == (grpc.StatusCode.ALREADY_EXISTS, "ACCOUNT_EXISTS")
        with pytest.raises(grpc.aio.AioRpcError) as no_key:
            await stub.RevokeKey(admin_pb2.RevokeKeyRequest(key_id="key_x"), metadata=admin_auth)
        assert _reason(no_key.value)[:2] == (grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")
    finally:
        await channel.close()


# An account key's own keys and daily usage (ImageService).


async def test_own_keys(url: str, astack: Stack) -> None:
    tenant = await make_tenant(astack.service, models=(MODEL, FLAKY))
    other = await make_tenant(astack.service)
    listed = await admin("GET", url, "/v1/keys", tenant.key)
    assert [k["id"] for k in listed.json()["data"]] == [tenant.key_id]

    created = await admin("POST", url, "/v1/keys", tenant.key, {"name": "ci", "models": [MODEL]})
    assert created.status == 200, created.body
    new_key, info = created.json()["key"], created.json()["info"]
    assert (info["models"], info["account"]) == ([MODEL], tenant.account)
    inherited = (await admin("POST", url, "/v1/keys", tenant.key, {"name": "same"})).json()
    assert inherited["info"]["models"] == [MODEL, FLAKY]
    wider = await admin("POST", url, "/v1/keys", tenant.key, {"models": ["dall-e-3"]})
    assert_error(wider, 403, "invalid_request_error", "model_not_allowed", "model")
    everything = await admin("POST", url, "/v1/keys", tenant.key, {"models": []})
    assert_error(everything, 403, "invalid_request_error", "model_not_allowed", "model")

    image = await sdk(url, new_key).images.generate(model=MODEL, prompt="a kite", size="1024x1024")
    assert image.data
    theirs = await admin("DELETE", url, f"/v1/keys/{other.key_id}", tenant.key)
    assert_error(theirs, 404, "invalid_request_error", "key_not_found", "key_id")
    assert (await admin("GET", url, "/v1/balance", other.key)).status == 200
    revoked = await admin("DELETE", url, f"/v1/keys/{info['id']}", tenant.key)
    assert revoked.json()["revoked"] is True
    with pytest.raises(openai.AuthenticationError):
        await sdk(url, new_key).images.generate(model=MODEL, prompt="a kite", size="1024x1024")

    daily = await admin("GET", url, "/v1/usage/daily?days=3", tenant.key)
    [bucket] = daily.json()["data"]
    assert (bucket["key_id"], bucket["requests"], bucket["spend_micros"]) == (
        info["id"],
        1,
        str(PRICE),
    )
    bad = await admin("GET", url, "/v1/usage/daily?days=367", tenant.key)
    assert_error(bad, 400, "invalid_request_error", "invalid_value", "days")
    assert_error(
        await admin("GET", url, "/v1/keys", None), 401, "invalid_request_error", "invalid_api_key"
    )


async def test_own_keys_over_grpc(astack: Stack) -> None:
    tenant = await make_tenant(astack.service)
    auth = [("authorization", f"Bearer {tenant.key}")]
    async with grpc_stub(astack.grpc_target) as stub:
        created = await stub.CreateOwnKey(images_pb2.CreateOwnKeyRequest(name="g"), metadata=auth)
        listed = await stub.ListOwnKeys(images_pb2.ListOwnKeysRequest(), metadata=auth)
        daily = await stub.GetDailyUsage(images_pb2.GetDailyUsageRequest(), metadata=auth)
        revoked = await stub.RevokeOwnKey(
            images_pb2.RevokeOwnKeyRequest(key_id=created.info.id), metadata=auth
        )
    assert created.key.startswith("sk-")
    assert {k.id for k in listed.data} == {tenant.key_id, created.info.id}
    assert list(daily.data) == []
    assert revoked.revoked


async def test_wrong_method_names_every_allowed_one(url: str, admin_key: str) -> None:
    reply = await admin("PUT", url, "/admin/v1/keys/key_x", admin_key)
    assert_error(reply, 405, "invalid_request_error", "method_not_allowed")
    assert reply.headers["Allow"] == "PATCH, DELETE"
    reply = await admin("DELETE", url, "/admin/v1/accounts", admin_key)
    assert reply.headers["Allow"] == "GET, POST"


async def test_bodies_refused_alike(url: str, admin_key: str) -> None:
    for body in (b"{", b"[]", b'{"name": 5}', b'{"name": "x", "credit_usd": 10}'):
        reply = await call(
            "POST",
            f"{url}/admin/v1/accounts",
            key=admin_key,
            body=body,
            headers={"Content-Type": "application/json"},
        )
        assert_error(reply, 400, "invalid_request_error", "invalid_json")


async def test_the_path_names_what_is_changed_not_the_body(
    url: str, admin_key: str, astack: Stack
) -> None:
    first = (await make_tenant(astack.service)).account
    second = await make_tenant(astack.service)
    reply = await admin(
        "POST",
        url,
        f"/admin/v1/accounts/{first}/credit",
        admin_key,
        {"account": second.account, "amount_usd": "1"},
    )
    assert (reply.status, reply.json().get("name")) == (200, first), reply.body
    patched = await admin(
        "PATCH",
        url,
        f"/admin/v1/keys/{second.key_id}",
        admin_key,
        {"key_id": "key_other", "limits": {"rpm": 9}},
    )
    assert (patched.status, patched.json().get("id")) == (200, second.key_id), patched.body


async def test_answers_match_the_openapi_document(url: str, admin_key: str, tenant: Tenant) -> None:
    from tests.test_openapi import _validator

    await sdk(url, tenant.key).images.generate(model=MODEL, prompt="a kite", size="1024x1024")
    for method, path, body, schema in (
        ("GET", "/admin/v1/accounts", None, "AccountList"),
        ("GET", f"/admin/v1/accounts/{tenant.account}", None, "AccountDetail"),
        ("POST", f"/admin/v1/accounts/{tenant.account}/credit", {"amount_usd": "1"}, "Account"),
        ("POST", "/admin/v1/keys", {"account": tenant.account, "limits": {"rpm": 1}}, "CreatedKey"),
        ("GET", f"/admin/v1/keys?account={tenant.account}", None, "KeyList"),
        ("PATCH", f"/admin/v1/keys/{tenant.key_id}", {"models": [MODEL]}, "KeyInfo"),
        ("GET", "/admin/v1/usage", None, "UsageBucketList"),
        ("GET", "/admin/v1/requests", None, "RequestList"),
        ("GET", "/admin/v1/models", None, "ModelInfoList"),
    ):
        reply = await admin(method, url, path, admin_key, body)
        assert reply.status == 200, (path, reply.body)
        assert reply.json()  # not an empty object
        _validator(schema).validate(reply.json())
    for path, schema in (("/v1/keys", "KeyList"), ("/v1/usage/daily", "UsageBucketList")):
        reply = await admin("GET", url, path, tenant.key)
        _validator(schema).validate(reply.json())
        assert reply.json()["data"]


async def test_the_request_log_names_the_admin_key_never_the_key(
    url: str, astack: Stack, tenant: Tenant
) -> None:
    from tests.test_request_logs import captured

    key, record = await Admin(astack.service.store).create_admin_key("audited")
    with captured() as capture:
        reply = await call(
            "POST",
            f"{url}/admin/v1/accounts/{tenant.account}/credit",
            key=key,
            json_body={"amount_usd": "1"},
            headers={"X-Request-ID": f"audit-{record.id}"},
        )
        assert reply.status == 200
    [line] = capture.objects("imagegate.request", f"audit-{record.id}")
    assert (line["rpc"], line["key_id"], line["status"]) == ("CreditAccount", record.id, "OK")
    assert all(key not in text for _, text in capture.lines)
