"""The web console's server side, without a browser: static files and their headers,
the session cookie, CSRF, and /console/api/ answering as the REST routes do."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path

import pytest

from gateway import console
from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, start_stack
from tests.rest import Reply, assert_error, call

STATIC = Path(console.__file__).parent / "console" / "static"
CONSOLE = {"X-Imagegate-Console": "1"}
BODY = {"model": "local", "prompt": "a lighthouse", "size": "256x256"}


@pytest.fixture(scope="module")
async def front(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Stack, str]]:
    stack, closers = await start_stack(tmp_path_factory.mktemp("console"), envoy=False)
    yield stack, stack.fronts["aiohttp"]
    for close in closers:
        await close()


@pytest.fixture
async def tenant_of(front: tuple[Stack, str]) -> Tenant:
    return await make_tenant(front[0].service)


def cookie(key: str) -> dict[str, str]:
    return {"Cookie": f"{console.COOKIE}={key}"}


async def sign_in(url: str, key: str, **headers: str) -> Reply:
    return await call(
        "POST", f"{url}/console/session", json_body={"key": key}, headers={**CONSOLE, **headers}
    )


def set_cookie(reply: Reply) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    jar.load(reply.headers["Set-Cookie"])
    return jar


def assert_console_headers(reply: Reply) -> None:
    assert reply.headers["Content-Security-Policy"] == console.CSP
    assert "script-src 'self'" in console.CSP and "unsafe-inline" not in console.CSP
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Referrer-Policy"] == "no-referrer"


async def test_index_and_every_file_it_loads_are_served_with_the_headers(
    front: tuple[Stack, str],
) -> None:
    _, url = front
    index = await call("GET", f"{url}/console/")
    assert index.status == 200 and index.headers["Content-Type"].startswith("text/html")
    assert_console_headers(index)
    html = index.body.decode()
    # CSP forbids inline code: every script and stylesheet is a file of the app.
    assert "<script>" not in html and "<style" not in html and " style=" not in html
    assert not re.search(r"\son\w+=", html)
    names = {p.name for p in STATIC.iterdir()}
    for name in names:
        reply = await call("GET", f"{url}/console/static/{name}")
        assert reply.status == 200, name
        assert_console_headers(reply)
        if name.endswith(".js"):
            assert reply.headers["Content-Type"].startswith("text/javascript")
            text = reply.body.decode()
            # Built with DOM calls: no HTML parsed from strings, no eval.
            for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "eval(", "Function("):
                assert sink not in text, (name, sink)
            # Only the theme is kept in the browser; never a key.
            for store in re.findall(r"(?:local|session)Storage\.setItem\(([^,]+),", text):
                assert store == '"imagegate-theme"', (name, store)
            assert "sessionStorage" not in text
            for imported in re.findall(r'from "\./([\w.]+)"', text):
                assert imported in names, (name, imported)
    assert re.findall(r'(?:src|href)="static/([\w.]+)"', html)
    for asset in re.findall(r'(?:src|href)="static/([\w.]+)"', html):
        assert asset in names
    redirect = await call("GET", f"{url}/console/static/../app.py")
    assert redirect.status == 404
    missing = await call("GET", f"{url}/console/static/nothing.js")
    assert_error(missing, 404, "invalid_request_error", "unknown_url")


async def test_console_without_slash_redirects(front: tuple[Stack, str]) -> None:
    _, url = front
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/console", allow_redirects=False) as reply,
    ):
        assert reply.status == 301 and reply.headers["Location"] == "/console/"


async def test_sign_in_sets_an_http_only_strict_cookie(
    front: tuple[Stack, str], tenant_of: Tenant
) -> None:
    _, url = front
    reply = await sign_in(url, tenant_of.key)
    assert reply.status == 200, reply.body
    assert reply.json()["role"] == "account"
    assert reply.headers["Cache-Control"] == "no-store"
    assert_console_headers(reply)
    morsel = set_cookie(reply)[console.COOKIE]
    assert morsel.value == tenant_of.key
    assert morsel["httponly"] and morsel["samesite"] == "Strict"
    assert morsel["path"] == "/console" and not morsel["secure"]
    # The key is in the cookie only: never in the body.
    assert tenant_of.key not in reply.body.decode()
    session = await call("GET", f"{url}/console/session", headers=cookie(tenant_of.key))
    assert session.status == 200 and session.json()["role"] == "account"
    out = await call("DELETE", f"{url}/console/session", headers=CONSOLE)
    assert out.status == 200
    cleared = set_cookie(out)[console.COOKIE]
    assert cleared.value == "" and cleared["max-age"] == "0"


async def test_cookie_is_secure_behind_a_trusted_tls_proxy(
    front: tuple[Stack, str], tenant_of: Tenant
) -> None:
    _, url = front
    # The test's client is on loopback, a trusted proxy by default.
    reply = await sign_in(url, tenant_of.key, **{"X-Forwarded-Proto": "https"})
    assert reply.status == 200
    assert set_cookie(reply)[console.COOKIE]["secure"]


@pytest.mark.parametrize("key", ["sk-not-a-key", "", "sk-admin-unknown", "x" * 300])
async def test_sign_in_refuses_unknown_keys(front: tuple[Stack, str], key: str) -> None:
    _, url = front
    reply = await sign_in(url, key)
    assert_error(reply, 401, "invalid_request_error", "invalid_api_key")
    assert "Set-Cookie" not in reply.headers
    missing = await call("GET", f"{url}/console/session")
    assert_error(missing, 401, "invalid_request_error", "invalid_api_key")


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no console header: a plain cross-site form post looks like this
        {**CONSOLE, "Origin": "http://evil.example"},
        {**CONSOLE, "Sec-Fetch-Site": "cross-site"},
        {**CONSOLE, "Sec-Fetch-Site": "same-site"},
        {"Origin": "SAME"},
    ],
)
async def test_state_changes_need_the_console_header_and_same_origin(
    front: tuple[Stack, str], tenant_of: Tenant, headers: dict[str, str]
) -> None:
    stack, url = front
    headers = {k: (url if v == "SAME" else v) for k, v in headers.items()}
    before = await balance(stack.service, tenant_of.account)
    generate = await call(
        "POST",
        f"{url}/console/api/v1/images/generations",
        json_body=BODY,
        headers={**headers, **cookie(tenant_of.key)},
    )
    assert_error(generate, 403, "invalid_request_error", "csrf_failed")
    assert await balance(stack.service, tenant_of.account) == before  # never a charge
    session = await call(
        "POST", f"{url}/console/session", json_body={"key": tenant_of.key}, headers=headers
    )
    assert_error(session, 403, "invalid_request_error", "csrf_failed")
    assert "Set-Cookie" not in session.headers


async def test_api_answers_as_the_rest_route_with_the_cookie_key(
    front: tuple[Stack, str], tenant_of: Tenant
) -> None:
    stack, url = front
    direct = await call("GET", f"{url}/v1/balance", key=tenant_of.key)
    proxied = await call("GET", f"{url}/console/api/v1/balance", headers=cookie(tenant_of.key))
    assert (proxied.status, proxied.body) == (direct.status, direct.body)
    assert_console_headers(proxied)
    assert proxied.headers["Cache-Control"] == "no-store"
    # Same-origin generation with the console header: charged like any request.
    before = await balance(stack.service, tenant_of.account)
    made = await call(
        "POST",
        f"{url}/console/api/v1/images/generations",
        json_body=BODY,
        headers={
            **CONSOLE,
            "Origin": url,
            "Sec-Fetch-Site": "same-origin",
            **cookie(tenant_of.key),
        },
    )
    assert made.status == 200, made.body
    assert len(made.json()["data"]) == 1
    after = await balance(stack.service, tenant_of.account)
    assert after < before
    usage = await call("GET", f"{url}/console/api/v1/usage?limit=1", headers=cookie(tenant_of.key))
    [record] = usage.json()["data"]
    assert record["request_id"] == made.headers["x-request-id"]
    assert int(record["cost_micros"]) == before - after


async def test_api_streams_events_with_the_console_headers(
    front: tuple[Stack, str], tenant_of: Tenant
) -> None:
    _, url = front
    reply = await call(
        "POST",
        f"{url}/console/api/v1/images/generations",
        json_body={**BODY, "stream": True, "partial_images": 2},
        headers={**CONSOLE, **cookie(tenant_of.key)},
    )
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert_console_headers(reply)
    events = re.findall(r"^event: (\S+)$", reply.body.decode(), re.M)
    assert events == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]


async def test_api_needs_a_session_and_ignores_authorization(
    front: tuple[Stack, str], tenant_of: Tenant
) -> None:
    _, url = front
    # A page cannot bring its own key: only the cookie's is used.
    reply = await call("GET", f"{url}/console/api/v1/balance", key=tenant_of.key)
    assert_error(reply, 401, "invalid_request_error", "invalid_api_key")
    bad = await call("GET", f"{url}/console/api/v1/balance", headers=cookie("sk-wrong"))
    assert_error(bad, 401, "invalid_request_error", "invalid_api_key")


async def test_api_unknown_paths_and_methods_are_the_table_rows(
    front: tuple[Stack, str], tenant_of: Tenant
) -> None:
    _, url = front
    unknown = await call("GET", f"{url}/console/api/v1/nothing", headers=cookie(tenant_of.key))
    error = assert_error(unknown, 404, "invalid_request_error", "unknown_url")
    assert error["message"] == "Invalid URL (GET /v1/nothing)"
    wrong = await call(
        "DELETE", f"{url}/console/api/v1/balance", headers={**CONSOLE, **cookie(tenant_of.key)}
    )
    assert_error(wrong, 405, "invalid_request_error", "method_not_allowed")
    loop = await call("GET", f"{url}/console/api/console/session", headers=cookie(tenant_of.key))
    assert_error(loop, 404, "invalid_request_error", "unknown_url")
    other = await call("GET", f"{url}/console/nothing")
    assert_error(other, 404, "invalid_request_error", "unknown_url")


async def test_rest_routes_carry_no_console_headers(front: tuple[Stack, str]) -> None:
    _, url = front
    reply = await call("GET", f"{url}/healthz")
    assert "Content-Security-Policy" not in reply.headers
    assert json.loads(reply.body)


@pytest.mark.envoy
@pytest.mark.skipif("envoy" not in FRONTS, reason="IMAGEGATE_TEST_FRONTS leaves Envoy out")
async def test_envoy_routes_the_console_to_the_aiohttp_front(stack: Stack) -> None:
    tenant = await make_tenant(stack.service)
    envoy, direct = stack.fronts["envoy"], stack.fronts["aiohttp"]
    for path in ("/console/", "/console/static/app.js"):
        through, own = await call("GET", envoy + path), await call("GET", direct + path)
        assert (through.status, through.body) == (own.status, own.body) and own.status == 200
        assert_console_headers(through)
    headers = {**CONSOLE, "Origin": envoy}
    signed = await call(
        "POST", f"{envoy}/console/session", json_body={"key": tenant.key}, headers=headers
    )
    assert signed.status == 200 and set_cookie(signed)[console.COOKIE].value == tenant.key
    balance_reply = await call("GET", f"{envoy}/console/api/v1/balance", headers=cookie(tenant.key))
    assert (
        balance_reply.json() == (await call("GET", f"{direct}/v1/balance", key=tenant.key)).json()
    )
    streamed = await call(
        "POST",
        f"{envoy}/console/api/v1/images/generations",
        json_body={**BODY, "stream": True},
        headers={**headers, **cookie(tenant.key)},
    )
    assert streamed.status == 200 and b"image_generation.completed" in streamed.body
    refused = await call(
        "POST",
        f"{envoy}/console/api/v1/images/generations",
        json_body=BODY,
        headers={"Origin": "http://evil.example", **cookie(tenant.key)},
    )
    assert_error(refused, 403, "invalid_request_error", "csrf_failed")


async def test_admin_key_opens_the_operator_view(
    front: tuple[Stack, str], tenant_of: Tenant
) -> None:
    from service.admin import Admin

    stack, url = front
    admin_key, _ = await Admin(stack.service.store).create_admin_key("console")
    reply = await sign_in(url, admin_key)
    assert reply.status == 200 and reply.json() == {"role": "admin", "account": None}
    accounts = await call("GET", f"{url}/console/api/admin/v1/accounts", headers=cookie(admin_key))
    assert tenant_of.account in {a["name"] for a in accounts.json()["data"]}
    # An account's session gets the admin API's own refusal, and its account's name.
    refused = await call(
        "GET", f"{url}/console/api/admin/v1/accounts", headers=cookie(tenant_of.key)
    )
    assert_error(refused, 403, "invalid_request_error", "admin_required")
    session = await call("GET", f"{url}/console/session", headers=cookie(tenant_of.key))
    assert session.json() == {"role": "account", "account": tenant_of.account}
    # The admin key cannot spend through the console either.
    spent = await call(
        "POST",
        f"{url}/console/api/v1/images/generations",
        json_body=BODY,
        headers={**CONSOLE, **cookie(admin_key)},
    )
    assert_error(spent, 401, "invalid_request_error", "invalid_api_key")


@pytest.mark.parametrize(
    ("peer", "proto", "secure"),
    [
        ("127.0.0.1", "https", True),
        ("::ffff:127.0.0.1", "https", True),
        ("10.1.2.3", "https", False),  # not a trusted proxy: its header is ignored
        ("127.0.0.1", "http", False),
        ("127.0.0.1", "", False),
    ],
)
def test_secure_only_over_tls_as_a_trusted_proxy_says(peer: str, proto: str, secure: bool) -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    app = web.Application()
    app[console.TRUSTED] = console._networks("127.0.0.0/8,::1/128")
    headers = {"X-Forwarded-Proto": proto} if proto else {}

    class Transport:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return (peer, 1234) if name == "peername" else default

    request = make_mocked_request(
        "POST", "/console/session", headers=headers, app=app, transport=Transport()
    )
    assert console._over_tls(request) is secure
