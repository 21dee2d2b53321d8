"""Property-based fuzz of the REST surface: both fronts, the same answer, a row of the table.

Requests are drawn from the OpenAPI document (gateway/openapi.json: its paths,
methods, parameters and body fields) and then bent: odd path segments and
percent escapes, unknown or repeated query parameters, header values with
control or non-ASCII bytes, bodies of the wrong JSON type or no JSON at all.
Each request goes as raw bytes to the aiohttp front and to Envoy, with the real
service behind both. For every request: no 5xx but 503/504, an error body is
exactly a row of the error table, and both fronts give the same status and the
same body bytes, once the fields that must differ are normalised (`created`,
the host and signature of image URLs). Seeded and bounded: well under a minute.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from gateway import errors
from tests.conftest import FRONTS, Stack, make_tenant
from tests.envoy_harness import REPO
from tests.raw_http import RawReply, exchange, host_of

pytestmark = pytest.mark.envoy

OPENAPI = json.loads((REPO / "gateway" / "openapi.json").read_text())
FIELDS: dict[str, Any] = OPENAPI["components"]["schemas"]["GenerateImagesRequest"]["properties"]
# The probes answer their own small JSON, not the error table, and their state
# (Envoy's cluster health vs the service's) is tested in test_health.py.
PROBES = ("/healthz", "/readyz")
OPERATIONS = [
    (path, method.upper())
    for path, ops in OPENAPI["paths"].items()
    for method in ops
    if path not in PROBES
]
QUERY_NAMES = sorted(
    {
        p["name"]
        for ops in OPENAPI["paths"].values()
        for op in ops.values()
        for p in op.get("parameters", ())
        if p["in"] == "query"
    }
)
# Every row of the table (gateway/errors.py), and the code a parameter error may name.
ROWS = {
    (row.status, row.type, row.code)
    for row in (*vars(errors).values(), *errors.BY_REASON.values())
    if isinstance(row, errors.Row) and row is not errors.INTERNAL
} | {(400, "invalid_request_error", "missing_required_parameter")}
# Sizes the local model renders quickly, plus ones it refuses.
SIZES = ["256x256", "512x512", "1024x1024", "auto", "999x999", "", "256X256"]

# --- strategies --------------------------------------------------------------------------

SAFE = "abcXYZ0129-._~!$&'()*+,;=:@"
ESCAPES = ["%2F", "%25", "%FF", "%C3%A9", "%00", "%41", "%ZZ", "%", "%2e", "+", "%2B"]
piece = st.one_of(st.text(SAFE, min_size=1, max_size=5), st.sampled_from(ESCAPES))
segment = st.lists(piece, min_size=0, max_size=4).map("".join)


METHODS = [
    *("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT"),
    *("get", "M-SEARCH", "PURGE", "G@T"),
]
# Host values: as sent, valid for Envoy's authority check, or not.
HOSTS = [b"{host}"] * 40 + [
    b"",
    b"images.example:8443",
    b"[::1]:80",
    b"a%b",
    b"a b",
    b"a/b",
    b"\xe9",
]
# One time in five, or in twelve (hypothesis would favour 0 of integers(0, 4)).
sometimes = st.sampled_from([False, False, False, False, True])
rarely = st.sampled_from([False] * 11 + [True])


@st.composite
def paths(draw: st.DrawFn) -> tuple[str, str]:
    """(method, path): an operation of the document, or a near miss."""
    # Mostly generations, the operation with a body.
    template, method = draw(st.sampled_from(OPERATIONS + [OPERATIONS[0]] * 3))
    path = re.sub(r"\{[^}]+\}", lambda _: draw(segment.filter(bool)), template)
    if draw(sometimes):
        path = draw(
            st.sampled_from([path + "/", path + "/" + draw(segment), "/v1/" + draw(segment)])
        )
    if draw(sometimes):
        method = draw(st.sampled_from(METHODS))
    return method, path


query = st.lists(
    st.tuples(st.sampled_from([*QUERY_NAMES, "image_id", "imageId", "prompt", "n", "x"]), segment),
    max_size=4,
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))

# Header values: printable ASCII, sometimes a control character or Latin-1 bytes.
_PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_LATIN1 = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=40,
)
header_text = st.one_of(*[_PRINTABLE] * 6, _LATIN1, _LATIN1, st.text("ab\x01\t\x7f", max_size=4))

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12),
)


_OF_TYPE = {
    "string": st.text(max_size=12),
    "integer": st.integers(-3, 12),
    "boolean": st.booleans(),
}


@st.composite
def field_value(draw: st.DrawFn, name: str) -> Any:
    """Mostly a value the document lists, else one of the field's type, else anything."""
    schema = FIELDS[name]
    known = [v for v in (*schema.get("enum", ()), *schema.get("examples", ())) if v is not None]
    known = {"size": SIZES, "n": [1, 2, 0, 11]}.get(name, known)
    kind = next(k for k in schema["type"] if k != "null")
    choices = [_OF_TYPE[kind]] * 2 + [json_scalar, st.lists(json_scalar, max_size=2)]
    if known:
        choices += [st.sampled_from(known)] * 6
    return draw(st.one_of(*choices))


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=5))
    body: dict[str, Any] = {name: draw(field_value(name)) for name in names}
    if draw(st.integers(0, 3)):
        body["prompt"] = draw(st.text(min_size=1, max_size=20))
    body["model"] = draw(st.sampled_from(["local", "local", "local", "dall-e-9", ""]))
    if draw(st.integers(0, 4)) == 0:
        body["extra"] = draw(json_scalar)
    return json.dumps(body, ensure_ascii=draw(st.booleans())).encode()


bodies = st.one_of(
    json_bodies(),
    json_bodies(),
    json_bodies(),
    st.binary(max_size=20),
    st.sampled_from(
        [b"", b" ", b"[]", b"null", b'"x"', b"{", b'{"prompt":"x",}', b"\xef\xbb\xbf{}"]
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """(a label, the raw request with {host} and {key...} placeholders)."""
    method, path = draw(paths())
    target = path
    q = draw(query)
    if q:
        target += "?" + q
    if draw(rarely):  # raw bytes Envoy and aiohttp refuse in a target
        target += draw(st.sampled_from(["\xe9", " x", "#f", "\x7f", "\x00"]))
    version = "HTTP/1.0" if draw(rarely) else "HTTP/1.1"
    lines = [f"{method} {target} {version}".encode("latin-1")]
    if version == "HTTP/1.1" or not draw(sometimes):
        lines.append(b"Host: " + draw(st.sampled_from(HOSTS)))
    auth = draw(st.sampled_from(["credit", "credit", "broke", "none", "junk", "twice"]))
    value = {"credit": b"Bearer {credit}", "broke": b"Bearer {broke}", "junk": b"Bearer sk-nope"}
    if auth == "twice":
        lines += [b"Authorization: Bearer {credit}", b"Authorization: Bearer {broke}"]
    elif auth != "none":
        lines.append(b"Authorization: " + value[auth])
    for name in ("X-Request-ID", "Idempotency-Key", "X-Request-ID"):
        if draw(st.booleans()):
            value = draw(header_text).encode("latin-1")
            # A key of its own per front and request: a replay from the other front's
            # stored result is right, but not the difference sought here.
            suffix = b"{idem}" if name == "Idempotency-Key" else b""
            lines.append(name.encode() + b": " + value + suffix)
    encoding = draw(st.sampled_from([None, None, None, "identity", "gzip", "x"]))
    if encoding is not None:
        lines.append(b"Content-Encoding: " + encoding.encode())
    if draw(sometimes):
        lines.append(b"Expect: " + draw(st.sampled_from([b"100-continue", b"magic"])))
    body = draw(bodies) if method == "POST" or draw(st.integers(0, 5)) == 0 else b""
    if body:
        lines.append(
            b"Content-Type: " + draw(st.sampled_from([b"application/json", b"text/plain"]))
        )
    if body and version == "HTTP/1.1" and draw(sometimes):
        lines.append(b"Transfer-Encoding: chunked")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif body:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return f"{method} {target}", b"\r\n".join(lines) + b"\r\n\r\n" + body


# --- the property ------------------------------------------------------------------------

# An image link: its host is the Host the client sent (so each front's own when
# sent as {host}); its id, expiry and signature are new each time.
_LINK = re.compile(rb"(/v1/images/files/)[A-Za-z0-9_-]+\.\w+\?expires=\d+&signature=[0-9a-f]+")


def normalised(reply: RawReply, host: str) -> tuple[int, bytes]:
    body = reply.body
    if reply.status == 200 and body.startswith(b'{"created":'):
        body = re.sub(rb'^\{"created":\d+', b'{"created":0', body)
        body = _LINK.sub(rb"\1LINK", body).replace(f"//{host}/".encode(), b"//{host}/")
    if reply.status == 200 and body.startswith(b'{"key":"sk-'):
        # POST /v1/keys: a new key each time, made a second or so apart.
        body = re.sub(rb'^\{"key":"[^"]+","info":\{"id":"[^"]+","prefix":"[^"]+"', b"KEY", body)
        body = re.sub(rb'"created":\d+', b'"created":0', body)
    if reply.status == 200 and reply.headers.get("content-type") == "text/event-stream":
        body = re.sub(rb'"created_at":\d+', b'"created_at":0', body)
    return reply.status, body


def check(reply: RawReply, label: str) -> None:
    assert reply.status < 500 or reply.status in (503, 504), (label, reply.status, reply.body[:300])
    # Envoy echoes even an empty one when it refuses a request before its Lua filter.
    assert "x-request-id" in reply.headers, label
    if reply.status >= 400 and reply.body:
        assert reply.headers.get("content-type") == "application/json", (label, reply.body[:200])
        error = reply.json()["error"]
        assert list(reply.json()) == ["error"]
        assert list(error) == ["message", "type", "param", "code"], label
        assert (reply.status, error["type"], error["code"]) in ROWS, (label, error)


@pytest.fixture(scope="module")
async def keys(stack: Stack) -> dict[bytes, bytes]:
    credit = await make_tenant(stack.service, credit_usd="50")
    broke = await make_tenant(stack.service, credit_usd="0")
    return {b"{credit}": credit.key.encode(), b"{broke}": broke.key.encode()}


@pytest.mark.skipif("envoy" not in FRONTS, reason="IMAGEGATE_TEST_FRONTS excludes envoy")
@seed(20261125)
@settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=requests())
async def test_both_fronts_answer_alike(
    stack: Stack, keys: dict[bytes, bytes], case: tuple[str, bytes]
) -> None:
    label, raw = case
    for placeholder, key in keys.items():
        raw = raw.replace(placeholder, key)
    replies = {}
    for front in ("aiohttp", "envoy"):
        unique = raw.replace(b"{idem}", uuid.uuid4().hex.encode())
        reply = await exchange(stack.fronts[front], unique)
        check(reply, f"{front}: {label}")
        replies[front] = normalised(reply, host_of(stack.fronts[front]))
    assert replies["aiohttp"] == replies["envoy"], label
    # --hypothesis-show-statistics shows what the examples reached.
    status, body = replies["envoy"]
    code = json.loads(body)["error"]["code"] if body.startswith(b'{"error"') else "-"
    code = "stream" if body.startswith(b"event: ") else code
    event(f"{status} {code}")
