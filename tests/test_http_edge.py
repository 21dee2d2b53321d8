"""Odd inputs at the HTTP layer: every one gets a row of the error table, on both fronts alike.

Raw bytes over a socket where no client library would send them; the real
service behind both fronts. Where Envoy's own HTTP parser behaves differently
and cannot be configured (docs/envoy.md, "Where the fronts differ"), each
front's answer is asserted separately: still a table row, never a 5xx.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from gateway import errors
from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service.images import NOT_FOUND
from service.keys import INVALID, MISSING
from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk
from tests.envoy_harness import ENVOY_YAML, EnvoyFront
from tests.raw_http import RawReply, closed_within, exchange
from tests.rest import assert_error, call

GENERATE = "/v1/images/generations"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
BODY = b'{"model":"local","prompt":"a kite","size":"256x256"}'


def assert_row(reply: RawReply, row: errors.Row, message: str | None = None) -> None:
    assert (reply.status, reply.body) == (row.status, errors.error_body(row, message))
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers.get("x-request-id")


def request(head: str | bytes, *, body: bytes = b"", key: str | None = None) -> bytes:
    """A request from its first lines (`{host}` is filled in), ending the headers for you."""
    lines = head.encode("latin-1") if isinstance(head, str) else head
    if key is not None:
        lines += f"\r\nAuthorization: Bearer {key}".encode()
    if body:
        lines += f"\r\nContent-Length: {len(body)}".encode()
    return lines + b"\r\nConnection: close\r\n\r\n" + body


# --- 1. request bodies in a Content-Encoding ------------------------------------------


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        ("deflate", BODY),  # plain JSON that does not inflate: a 500 before
        ("gzip", BODY),
        ("gzip", gzip.compress(BODY)),  # even a real one: neither front decodes bodies
        ("br", BODY),
        ("x-unknown", BODY),
        ("identity, gzip", BODY),
    ],
    ids=["deflate-plain", "gzip-plain", "gzip-real", "br", "unknown", "identity-gzip"],
)
async def test_encoded_bodies_are_invalid_json(
    base_url: str, stack: Stack, tenant: Tenant, coding: str, body: bytes
) -> None:
    reply = await call(
        "POST",
        base_url + GENERATE,
        key=tenant.key,
        body=body,
        headers={"Content-Type": "application/json", "Content-Encoding": coding},
    )
    assert_error(reply, 400, "invalid_request_error", "invalid_json")
    assert await balance(stack.service, tenant.account) == 1_000_000


@pytest.mark.parametrize("coding", ["identity", "Identity", ""])
async def test_identity_encoding_is_plain(base_url: str, tenant: Tenant, coding: str) -> None:
    reply = await call(
        "POST", base_url + GENERATE, key=tenant.key, body=BODY, headers={"Content-Encoding": coding}
    )
    assert reply.status == 200, reply.body[:300]


# --- 2. odd values on image links -------------------------------------------------------


async def _link(base_url: str, tenant: Tenant) -> tuple[str, str, str]:
    result = await sdk(base_url, tenant.key).images.generate(
        model="local", prompt="a kite", size="256x256"
    )
    url = result.data[0].url
    assert url is not None
    path, _, query = url.partition("?")
    params = dict(pair.split("=") for pair in query.split("&"))
    return path, params["expires"], params["signature"]


async def test_odd_link_values_are_image_not_found(base_url: str, tenant: Tenant) -> None:
    path, expires, signature = await _link(base_url, tenant)
    assert (await call("GET", f"{path}?expires={expires}&signature={signature}")).status == 200
    image_id = path.rsplit("/", 1)[1]
    files = path.rsplit("/", 1)[0]
    odd = [
        f"{path}?expires=%C2%B2&signature={signature}",  # '²': str.isdigit() says yes
        f"{path}?expires=%EF%BC%99{expires[1:]}&signature={signature}",  # fullwidth 9
        f"{path}?expires={'9' * 5000}&signature={signature}",  # int() refuses 5000 digits
        f"{path}?expires={expires}&signature=%C3%A9{signature[2:]}",  # compare_digest: ASCII only
        f"{path}?expires={expires}&signature={signature.upper()}",
        f"{path}?expires={expires}&signature=zz{signature[2:]}",
        f"{path}?expires={expires}&signature=%FF{signature[2:]}",  # invalid UTF-8 once decoded
        f"{path}?expires=%FF&signature={signature}",
        f"{path}?expires= {expires}&signature={signature}",
        f"{files}/%FF{image_id}?expires={expires}&signature={signature}",
        f"{files}/%00{image_id}?expires={expires}&signature={signature}",
        f"{files}/..%2F{image_id}?expires={expires}&signature={signature}",
    ]
    for url in odd:
        reply = await call("GET", url)
        error = assert_error(reply, 404, "invalid_request_error", "image_not_found")
        assert error["message"] == NOT_FOUND, url


async def test_a_valid_link_ignores_other_query_parameters(base_url: str, tenant: Tenant) -> None:
    path, expires, signature = await _link(base_url, tenant)
    # Envoy's transcoder would bind image_id (or imageId) from the query over the path.
    for extra in ("image_id=other.png", "imageId=other.png", "x=%FF", "expires.x=1"):
        url = f"{path}?expires={expires}&signature={signature}&{extra}"
        reply = await call("GET", url)
        assert (reply.status, reply.headers["Content-Type"]) == (200, "image/png"), extra


# --- 3. characters in the headers the service reads -----------------------------------


async def test_non_ascii_header_values(base_url: str, tenant: Tenant) -> None:
    # Bytes gRPC metadata cannot carry reach the service as '?' from both fronts
    # (the aiohttp front gave 500: grpc refuses to send them).
    key = tenant.key.encode()
    head = b"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer sk-\xc3\xa9"
    assert_row(
        await exchange(base_url, request(head)), errors.BY_REASON["INVALID_API_KEY"], INVALID
    )
    # A valid key followed by a no-break space is a wrong key, not a trimmed one.
    head = b"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer " + key + b"\xc2\xa0"
    assert_row(
        await exchange(base_url, request(head)), errors.BY_REASON["INVALID_API_KEY"], INVALID
    )
    head = b"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer\t" + key
    assert_row(
        await exchange(base_url, request(head)), errors.BY_REASON["INVALID_API_KEY"], MISSING
    )
    head = b"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer " + key
    reply = await exchange(base_url, request(head + b"\r\nIdempotency-Key: k\xc3\xa9y\xff"))
    assert reply.status == 200
    reply = await exchange(base_url, request(head + b"\r\nX-Request-ID: caf\xc3\xa9"))
    assert reply.status == 200 and UUID_RE.fullmatch(reply.headers["x-request-id"])


@pytest.mark.parametrize(
    "header",
    [
        b"Host: caf\xc3\xa9.example",
        b"Host: ex ample",
        b"Host: a/b",
        b"Host: a\x01b",
        b"X-Request-ID: a\x01b",
        b"Idempotency-Key: k\x7fy",
        b"Authorization: Bearer sk-\x00",
    ],
    ids=["host-utf8", "host-space", "host-slash", "host-ctl", "rid-ctl", "idem-del", "auth-nul"],
)
async def test_headers_envoy_refuses_are_malformed(base_url: str, header: bytes) -> None:
    host = b"" if header.startswith(b"Host:") else b"Host: {host}\r\n"
    reply = await exchange(base_url, request(b"GET /v1/models HTTP/1.1\r\n" + host + header))
    assert_row(reply, errors.MALFORMED)


# --- 4. framing errors and malformed request lines --------------------------------------

LONG = "a" * 9000
MALFORMED = {
    "garbage-line": "GARBAGE",
    "bad-method": "G@T /v1/models HTTP/1.1\r\nHost: {host}",
    "no-slash": "GET v1/models HTTP/1.1\r\nHost: {host}",
    "space-in-path": "GET /v1/mo dels HTTP/1.1\r\nHost: {host}",
    "ctl-in-path": "GET /v1/mo\x01dels HTTP/1.1\r\nHost: {host}",
    "utf8-in-path": "GET /v1/mod\xc3\xa9ls HTTP/1.1\r\nHost: {host}",
    "fragment": "GET /v1/models#top HTTP/1.1\r\nHost: {host}",
    "fragment-in-query": "GET /v1/models?a=1#top HTTP/1.1\r\nHost: {host}",
    "asterisk": "GET * HTTP/1.1\r\nHost: {host}",
    "options-asterisk-x": "OPTIONS *x HTTP/1.1\r\nHost: {host}",
    "no-host-1.1": "GET /v1/models HTTP/1.1",
    "no-host-1.0": "GET /v1/models HTTP/1.0",
    "header-space": "GET /v1/models HTTP/1.1\r\nHost: {host}\r\nBad Name: x",
    "header-no-colon": "GET /v1/models HTTP/1.1\r\nHost: {host}\r\nNoColon",
    "bad-content-length": "POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\n"
    "Content-Length: ab",
    "negative-length": "POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\nContent-Length: -1",
    "two-lengths": "POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\n"
    "Content-Length: 2\r\nContent-Length: 3",
    "length-and-chunked": "POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\n"
    "Content-Length: 2\r\nTransfer-Encoding: chunked",
    "unknown-transfer-encoding": "POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\n"
    "Transfer-Encoding: gzip",  # Envoy: 501, which was the 500 row
    "bad-chunk": "POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\n"
    "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0",
    "websocket": "GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
    "Upgrade: websocket",  # Envoy: 403 with no body
    "m-search": "M-SEARCH /v1/models HTTP/1.1\r\nHost: {host}",  # Envoy's parser refuses it
    "connect-path": "CONNECT /v1/models HTTP/1.1\r\nHost: {host}",
}
TOO_LARGE = {
    "long-header": f"GET /v1/models HTTP/1.1\r\nHost: {{host}}\r\nX-Big: {LONG}",
    "long-target": f"GET /v1/models?{LONG} HTTP/1.1\r\nHost: {{host}}",
    "101-headers": "GET /v1/models HTTP/1.1\r\nHost: {host}\r\n"
    + "\r\n".join(f"X-H{i}: v" for i in range(99)),  # with Connection: close
    "9-KiB-in-all": "GET /v1/models HTTP/1.1\r\nHost: {host}\r\n"
    + "\r\n".join(f"X-H{i}: {'v' * 1000}" for i in range(9)),
}


def _raw(head: str) -> bytes:
    return head.encode("latin-1") + b"\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("head", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_requests(base_url: str, head: str) -> None:
    assert_row(await exchange(base_url, _raw(head)), errors.MALFORMED)


@pytest.mark.parametrize("head", TOO_LARGE.values(), ids=TOO_LARGE.keys())
async def test_oversized_request_heads(base_url: str, head: str) -> None:
    assert_row(await exchange(base_url, _raw(head)), errors.HEADERS_TOO_LARGE)


async def test_head_limits_are_inclusive(base_url: str, tenant: Tenant) -> None:
    # 100 headers (Connection: close and Authorization included) pass.
    head = "GET /v1/models HTTP/1.1\r\nHost: {host}\r\n" + "\r\n".join(
        f"X-H{i}: v" for i in range(97)
    )
    reply = await exchange(base_url, request(head, key=tenant.key))
    assert reply.status == 200, reply.body


# Envoy's parser accepts these and aiohttp's refuses them; neither can be configured.
NO_KEY = (errors.BY_REASON["INVALID_API_KEY"], MISSING)
# aiohttp's parser refuses these (the malformed row) and Envoy's does not; neither
# parser can be configured to agree. Envoy's answer to each, all 4xx.
PARSERS_DIFFER: dict[str, tuple[bytes, tuple[errors.Row, str | None] | None]] = {
    "bare-lf": (b"GET /v1/models HTTP/1.1\nHost: {host}\nConnection: close\n\n", NO_KEY),
    "obs-fold": (_raw("GET /v1/models HTTP/1.1\r\nHost: {host}\r\nX-A: a\r\n b"), NO_KEY),
    "http-9.9": (_raw("GET /v1/models HTTP/9.9\r\nHost: {host}"), NO_KEY),
    "tab-in-request-line": (_raw("GET /v1/models\t HTTP/1.1\r\nHost: {host}"), NO_KEY),
    # Envoy joins them (the first names the host of image URLs).
    "two-hosts": (_raw("GET /v1/models HTTP/1.1\r\nHost: {host}\r\nHost: {host}"), NO_KEY),
    # A method only Envoy's parser knows.
    "msearch": (
        _raw("MSEARCH /v1/models HTTP/1.1\r\nHost: {host}"),
        (errors.WRONG_METHOD, errors.wrong_method_message("MSEARCH", "/v1/models")),
    ),
    # A method only aiohttp's parser knows: Envoy's codec answers a bare 400 itself.
    "query": (_raw("QUERY /v1/models HTTP/1.1\r\nHost: {host}"), None),
}


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("case", PARSERS_DIFFER.values(), ids=PARSERS_DIFFER.keys())
async def test_where_the_parsers_differ(
    stack: Stack, front: str, case: tuple[bytes, tuple[errors.Row, str | None] | None]
) -> None:
    raw, envoy = case
    reply = await exchange(stack.fronts[front], raw, timeout_s=10)
    if front == "aiohttp":
        assert_row(reply, errors.MALFORMED)
    elif envoy is None:
        assert (reply.status, reply.body) == (400, b"")
    else:
        assert_row(reply, *envoy)


async def test_refused_requests_echo_a_safe_request_id(base_url: str) -> None:
    head = "GET /v1/models HTTP/1.0\r\nX-Request-ID: trace-7"  # no Host: refused
    reply = await exchange(base_url, _raw(head))
    assert_row(reply, errors.MALFORMED)
    assert reply.headers["x-request-id"] == "trace-7"


async def test_unknown_expectation_is_ignored(base_url: str) -> None:
    reply = await exchange(base_url, _raw("POST /nope HTTP/1.1\r\nHost: {host}\r\nExpect: magic"))
    assert_row(reply, errors.UNKNOWN_URL, "Invalid URL (POST /nope)")
    reply = await exchange(base_url, _raw("GET /v1/models HTTP/1.1\r\nHost: {host}\r\nExpect: x"))
    assert_row(reply, errors.BY_REASON["INVALID_API_KEY"], MISSING)


async def test_routes_match_the_raw_path(base_url: str) -> None:
    # %6D is 'm': aiohttp's router decodes it, Envoy's Lua does not; both say 404 now.
    reply = await exchange(base_url, _raw("GET /v1/%6Dodels HTTP/1.1\r\nHost: {host}"))
    assert_row(reply, errors.UNKNOWN_URL, "Invalid URL (GET /v1/%6Dodels)")


async def test_path_variables_decode_alike(stack: Stack, tenant: Tenant) -> None:
    # The model id is echoed in the error: both fronts must decode it alike
    # (as Envoy's transcoder does: every escape, '/' included; invalid UTF-8 as sent).
    if "envoy" not in stack.fronts:
        pytest.skip("IMAGEGATE_TEST_FRONTS excludes envoy")
    for segment in ("%2F", "%2Fx%3F", "%C3%A9", "a%20b", "%25", "%FF", "%2F%FF", "%ZZ", "%", "+"):
        bodies = set()
        for url in stack.fronts.values():
            reply = await call("GET", f"{url}/v1/models/{segment}", key=tenant.key)
            assert_error(reply, 404, "invalid_request_error", "model_not_found", None)
            bodies.add(reply.body)
        assert len(bodies) == 1, (segment, bodies)


async def test_query_values_decode_alike(stack: Stack, tenant: Tenant) -> None:
    # Values that decode to invalid UTF-8 are empty on both fronts (Envoy's Lua
    # empties them; aiohttp would have made U+FFFD of them).
    if "envoy" not in stack.fronts:
        pytest.skip("IMAGEGATE_TEST_FRONTS excludes envoy")
    for query in (
        "after=%FF",
        "limit=%FF",
        "limit=2&limit=%FF",
        "limit=%C3%A9",
        "limit=1+",
        "after=%ZZ",
    ):
        answers = set()
        for url in stack.fronts.values():
            reply = await call("GET", f"{url}/v1/usage?{query}", key=tenant.key)
            answers.add((reply.status, reply.body))
        assert len(answers) == 1, (query, answers)


# --- 6. request ids -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    ["a" * 129, "a b", "id/1", "<script>", "id;1", "", "é"],
    ids=["129-chars", "space", "slash", "angle", "semicolon", "empty", "latin1"],
)
async def test_unsafe_request_ids_are_replaced(base_url: str, sent: str) -> None:
    reply = await exchange(
        base_url, request(f"GET /nope HTTP/1.1\r\nHost: {{host}}\r\nX-Request-ID: {sent}".encode())
    )
    assert reply.status == 404
    assert UUID_RE.fullmatch(reply.headers["x-request-id"]), reply.headers["x-request-id"]


@pytest.mark.parametrize(
    "sent", ["a" * 128, "trace-1.2:3_X", "0f8fad5b-d9cb-469f-a165-70867728950e"]
)
async def test_safe_request_ids_are_kept(base_url: str, sent: str) -> None:
    reply = await call("GET", base_url + "/nope", headers={"X-Request-ID": sent})
    assert reply.headers["x-request-id"] == sent


async def test_the_service_stores_the_replacement(base_url: str, stack: Stack) -> None:
    tenant = await make_tenant(stack.service)
    sent = "x" * 200
    reply = await call(
        "POST", base_url + GENERATE, key=tenant.key, body=BODY, headers={"X-Request-ID": sent}
    )
    assert reply.status == 200
    [usage] = await stack.service.store.usage(tenant.account)
    assert usage.request_id == reply.headers["x-request-id"] != sent


# --- 7. read timeouts -----------------------------------------------------------------

HALF_HEAD = b"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nX-Partial: ab"
HALF_BODY = b"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100\r\n\r\n{"
WHOLE = b"GET /nope HTTP/1.1\r\nHost: {host}\r\n\r\n"


async def test_aiohttp_front_closes_slow_connections(stack: Stack) -> None:
    config = GatewayConfig(grpc_target=stack.grpc_target, header_timeout_s=0.5, body_timeout_s=0.5)
    runner = await start_gateway(config, port=0)
    url = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        for data in (b"", HALF_HEAD, WHOLE):  # silent, half a head, idle after a reply
            closed, received = await closed_within(url, data, 10)
            assert closed, data
            assert received.startswith(b"HTTP/1.1 404") if data == WHOLE else not received
        closed, received = await closed_within(url, HALF_BODY, 10)
        assert closed
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert body == errors.error_body(errors.REQUEST_TIMEOUT)
    finally:
        await runner.cleanup()


@pytest.mark.envoy
async def test_envoy_front_closes_slow_connections(stack: Stack, tmp_path: Path) -> None:
    if "envoy" not in FRONTS:
        pytest.skip("IMAGEGATE_TEST_FRONTS excludes envoy")
    config = yaml.safe_load(ENVOY_YAML.read_text())
    [listener] = config["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.update(request_headers_timeout="0.5s", request_timeout="1s")
    hcm["common_http_protocol_options"]["idle_timeout"] = "0.5s"
    source = tmp_path / "envoy.yaml"
    source.write_text(json.dumps(config))
    front = await EnvoyFront.start(stack.service.port, source=source)
    try:
        for data in (b"", WHOLE):
            closed, received = await closed_within(front.base_url, data, 10)
            assert closed, data
        for data in (HALF_HEAD, HALF_BODY):
            closed, received = await closed_within(front.base_url, data, 10)
            assert closed, data
            # Unlike aiohttp, Envoy answers a half-sent head too.
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), received
            assert body == errors.error_body(errors.REQUEST_TIMEOUT)
    finally:
        await front.stop()


# --- 8. keys never reach a log ----------------------------------------------------------


async def test_no_key_in_any_log(
    stack: Stack, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    url = stack.fronts["aiohttp"]
    key = tenant.key
    attempts = [
        f"GET /v1/models HTTP/1.1\r\nHost: {{host}}\r\nAuthorization: Bearer {key}\x01",
        f"GET /v1/models?key={key} HTTP/9.9\r\nHost: {{host}}",
        f"GET /v1/{key} HTTP/1.1\r\nHost: {{host}}\r\nAuthorization: Bearer {key}",
        f"GET /v1/models HTTP/1.1\r\nHost: {{host}}\r\nAuthorization: Bearer {key}{'x' * 9000}",
        f"GET /v1/models HTTP/1.1\r\nHost: {{host}}\r\nAuthorization: {key}\r\nX: a\r\n b",
        f"GET /v1/models HTTP/1.1\r\nHost: {{host}}\r\nAuthorization: Basic {key}\r\nBad Name: x",
        f"POST /v1/images/generations HTTP/1.1\r\nHost: {{host}}\r\nAuthorization: Bearer {key}\r\n"
        "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0",
        f"{key} /v1/models HTTP/1.1\r\nHost: {{host}}",
        f"GET /v1/models HTTP/1.1\r\nHost: {key}\x7f",
    ]
    with caplog.at_level(logging.DEBUG):
        for head in attempts:
            reply = await exchange(url, _raw(head))
            assert reply.status < 500
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "") + str(record.exc_info or "")
        text += str(getattr(record, "fields", ""))
        assert key not in text, (record.name, text[:300])
        assert key[3:20] not in text, (record.name, text[:300])
    assert key not in caplog.text
