"""Bad uploads on both fronts: each the right error-table row, nothing charged, and the
fronts' memory bounded by the upload limit however much a client sends.

Also the model rules around edits (which models may, who serves them) and money:
input-image tokens of token-priced models are charged from the reported usage.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway import errors
from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service.config import Config
from service.providers.base import TokenUsage
from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk
from tests.envoy_harness import ENVOY_YAML, EnvoyFront
from tests.fakes.scripted import OK, Step
from tests.fakes.scripted_editor import ScriptedEditor
from tests.providers_harness import model, provider, provider_stack, route
from tests.rest import Reply, assert_error, call
from tests.upload_helpers import bomb, data_url, mask, multipart, png

MiB = 1024 * 1024
CREDIT = 1_000_000
SOURCE = png((64, 64))
SMALL_FILE_CAP = 200_000
EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"
KINDS = {"openai_compatible": "tests.fakes.scripted", "stability": "tests.fakes.scripted_editor"}
GPT_PRICES = {"text_input": 5_000_000, "image_input": 10_000_000, "output": 40_000_000}


@pytest.fixture(scope="module")
async def ustack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    local = route("offline", "local")
    async with provider_stack(
        tmp_path_factory.mktemp("uploads"),
        providers={
            "offline": provider("local"),
            "plain": provider("openai_compatible", "http://127.0.0.1:9/v1"),
            "editor": provider("stability"),
        },
        models={
            "small-inputs": model(
                local, edits=True, variations=True, inputs={"max_bytes": SMALL_FILE_CAP}
            ),
            "no-edits": model(local),
            "catalog-only": model(route("plain", "x"), edits=True, variations=True),
            "token-editor": model(
                route("editor", "gpt-image-1"),
                edits=True,
                token_prices=GPT_PRICES,
                prices={"standard": {"1024x1024": 42_000}},
            ),
        },
        kind_modules=KINDS,
        image_url_hosts="127.0.0.1",
    ) as stack:
        yield stack


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest, ustack: Stack) -> str:
    return ustack.fronts[request.param]


@pytest.fixture
async def who(ustack: Stack) -> Tenant:
    return await make_tenant(ustack.service)


async def upload(url: str, key: str, parts: list, **headers: str) -> Reply:  # type: ignore[type-arg]
    ctype, body = multipart(parts)
    return await call("POST", url, key=key, body=body, headers={"Content-Type": ctype, **headers})


async def assert_nothing_charged(stack: Stack, tenant: Tenant) -> None:
    assert await balance(stack.service, tenant.account) == CREDIT
    # Refused before anything was reserved: not even a released reservation exists.
    assert await stack.service.store.usage(tenant.account) == []


def image(data: bytes, name: str = "image.png", field: str = "image[]") -> tuple:  # type: ignore[type-arg]
    return (field, (name, data, "image/png"))


# --- bad uploads: the table's rows, no charge ------------------------------------------


async def test_oversized_file(ustack: Stack, front: str, who: Tenant) -> None:
    big = SOURCE + b"\x00" * SMALL_FILE_CAP  # a PNG with trailing bytes: over the cap
    reply = await upload(
        front + EDITS, who.key, [("model", "small-inputs"), ("prompt", "p"), image(big)]
    )
    error = assert_error(reply, 413, "invalid_request_error", "request_too_large", "image")
    assert f"{SMALL_FILE_CAP:,} bytes" in error["message"]
    reply = await upload(
        front + EDITS,
        who.key,
        [("prompt", "p"), image(SOURCE), ("mask", ("m.png", b"\x89PNG" + b"\0" * 5 * MiB, "x"))],
    )
    assert_error(reply, 413, "invalid_request_error", "request_too_large", "mask")
    await assert_nothing_charged(ustack, who)


async def test_too_many_files(ustack: Stack, front: str, who: Tenant) -> None:
    reply = await upload(
        front + EDITS, who.key, [("model", "small-inputs"), ("prompt", "p")] + [image(SOURCE)] * 17
    )
    error = assert_error(reply, 400, "invalid_request_error", "invalid_value", "image")
    assert "at most 16" in error["message"]
    two = [image(SOURCE, field="image"), image(SOURCE, field="image")]
    reply = await upload(front + VARIATIONS, who.key, [("model", "small-inputs"), *two])
    assert_error(reply, 400, "invalid_request_error", "invalid_value", "image")
    await assert_nothing_charged(ustack, who)


@pytest.mark.parametrize(
    "data",
    [b"%PDF-1.4 not an image at all", b"GIF89a" + SOURCE[6:], SOURCE[: len(SOURCE) // 2]],
    ids=["pdf", "gif-magic", "truncated-png"],
)
async def test_non_image_with_an_image_name(
    ustack: Stack, front: str, who: Tenant, data: bytes
) -> None:
    reply = await upload(front + EDITS, who.key, [("prompt", "p"), image(data, "cat.png")])
    error = assert_error(reply, 400, "invalid_request_error", "invalid_value", "image")
    assert "not its name" in error["message"]
    await assert_nothing_charged(ustack, who)


async def test_decompression_bomb(ustack: Stack, front: str, who: Tenant) -> None:
    data = bomb()  # ~100 KB that decode to 100 megapixels
    for path, parts in (
        (EDITS, [("prompt", "p"), image(data)]),
        (VARIATIONS, [image(data, field="image")]),
    ):
        reply = await upload(front + path, who.key, parts)
        error = assert_error(reply, 400, "invalid_request_error", "invalid_value", "image")
        assert "10000x10000" in error["message"] and "40,000,000 pixels" in error["message"]
    await assert_nothing_charged(ustack, who)


async def test_truncated_multipart_body(ustack: Stack, front: str, who: Tenant) -> None:
    ctype, body = multipart([("prompt", "p"), image(SOURCE)])
    for cut in (body[: len(body) // 2], body[: body.rindex(b"--imagegate")]):
        reply = await call(
            "POST", front + EDITS, key=who.key, body=cut, headers={"Content-Type": ctype}
        )
        error = assert_error(reply, 400, "invalid_request_error", "invalid_multipart")
        assert "multipart/form-data" in error["message"]
    reply = await call(
        "POST", front + VARIATIONS, key=who.key, body=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert_error(reply, 400, "invalid_request_error", "invalid_multipart")
    await assert_nothing_charged(ustack, who)


async def test_encoded_upload_is_refused_by_both_fronts(
    ustack: Stack, front: str, who: Tenant
) -> None:
    reply = await upload(front + EDITS, who.key, [("prompt", "p")], **{"Content-Encoding": "gzip"})
    assert (reply.status, reply.body) == (400, errors.error_body(errors.ENCODED_UPLOAD))
    await assert_nothing_charged(ustack, who)


async def test_models_that_cannot_edit_are_named(ustack: Stack, front: str, who: Tenant) -> None:
    for name, path, parts in (
        ("image edits", EDITS, [("prompt", "p"), image(SOURCE)]),
        ("image variations", VARIATIONS, [image(SOURCE, field="image")]),
    ):
        reply = await upload(front + path, who.key, [("model", "no-edits"), *parts])
        error = assert_error(reply, 400, "invalid_request_error", "invalid_value", "model")
        assert error["message"] == f"Model 'no-edits' does not support {name}."
        # The catalog says it can, but its provider has no edit: refused just as clearly.
        reply = await upload(front + path, who.key, [("model", "catalog-only"), *parts])
        error = assert_error(reply, 400, "invalid_request_error", "invalid_value", "model")
        assert error["message"] == f"Model 'catalog-only' does not support {name} on this gateway."
    await assert_nothing_charged(ustack, who)


# --- what works --------------------------------------------------------------------------


async def test_remote_image_url_from_an_allowed_host(
    ustack: Stack, front: str, who: Tenant
) -> None:
    app = web.Application()
    app.router.add_get("/a.png", _png_response)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/a.png"
    try:
        reply = await call(
            "POST",
            front + EDITS,
            key=who.key,
            json_body={
                "model": "small-inputs",
                "prompt": "p",
                "images": [{"image_url": url}, {"image_url": data_url(SOURCE)}],
                "size": "256x256",
            },
        )
    finally:
        await runner.cleanup()
    assert reply.status == 200, reply.body
    assert await balance(ustack.service, who.account) == CREDIT - 1000


async def _png_response(request: web.Request) -> web.Response:
    return web.Response(body=SOURCE, content_type="image/png")


async def test_input_image_tokens_are_charged_from_reported_usage(
    ustack: Stack, front: str, who: Tenant
) -> None:
    editor = ustack.service.registry.providers["editor"]
    assert isinstance(editor, ScriptedEditor)
    editor.calls.clear()
    editor.then(
        Step(usage=TokenUsage(input_text_tokens=50, input_image_tokens=6000, output_tokens=1000))
    )
    client = sdk(front, who.key)
    result = await client.images.edit(
        model="token-editor",
        image=("a.png", SOURCE, "image/png"),
        mask=("m.png", mask((64, 64), (0, 0, 9, 9)), "image/png"),
        prompt="p",
    )
    assert result.usage is not None
    assert (result.usage.input_tokens_details.image_tokens, result.usage.output_tokens) == (
        6000,
        1000,
    )
    # 50 x 5 + 6000 x 10 + 1000 x 40 USD per 1M tokens = 100,250 micro-USD: more than the
    # image's list price (42,000), within it plus the inputs' bound.
    assert await balance(ustack.service, who.account) == CREDIT - 100_250
    [sent] = editor.calls
    assert sent.request.operation == "edit"
    assert [i.data for i in sent.images] == [SOURCE]
    assert sent.mask is not None and sent.mask.width == 64
    editor.default = OK


# --- the whole body's limit, and memory ----------------------------------------------------


async def test_body_limit_is_the_same_on_both_fronts(
    ustack: Stack, front: str, who: Tenant
) -> None:
    limit = GatewayConfig().max_upload_bytes
    ctype, head = multipart([("prompt", "p"), image(SOURCE)])
    pad = b"--" + ctype.split("boundary=")[1].encode()

    def body(size: int) -> bytes:
        # A first, overlong prompt fills the body up to `size` bytes exactly.
        part = pad + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'
        return part + b"x" * (size - len(part) - 2 - len(head)) + b"\r\n" + head

    exact = body(limit)
    assert len(exact) == limit
    reply = await call(
        "POST", front + EDITS, key=who.key, body=exact, headers={"Content-Type": ctype}
    )
    # Through the front: the service answered (that prompt is too long a text field).
    assert_error(reply, 400, "invalid_request_error", "invalid_value", "prompt")
    over = exact + b"\n"
    reply = await call(
        "POST", front + EDITS, key=who.key, body=over, headers={"Content-Type": ctype}
    )
    assert (reply.status, reply.body) == (413, errors.error_body(errors.TOO_LARGE))
    await assert_nothing_charged(ustack, who)


async def _stream_upload(url: str, key: str, total: int) -> tuple[int, bytes]:
    """POST `total` bytes of a multipart body, produced as it is sent (nothing held here)."""
    ctype, _ = multipart([])
    boundary = ctype.split("boundary=")[1]
    disposition = 'Content-Disposition: form-data; name="image"; filename="a.png"'

    async def chunks() -> AsyncIterator[bytes]:
        yield f"--{boundary}\r\n{disposition}\r\n\r\n".encode()
        block = b"\x89PNG" * (16 * 1024)
        sent = 0
        while sent < total:
            yield block
            sent += len(block)

    headers = {"Content-Type": ctype, "Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=chunks(), headers=headers) as response,  # chunked: no length
    ):
        return response.status, await response.read()


async def test_aiohttp_front_memory_stays_bounded(ustack: Stack, tmp_path: Path) -> None:
    limit = 2 * MiB
    runner = await start_gateway(
        GatewayConfig(grpc_target=ustack.grpc_target, max_upload_bytes=limit), port=0
    )
    who = await make_tenant(ustack.service)
    url = f"http://127.0.0.1:{bound_port(runner)}{EDITS}"
    try:
        tracemalloc.start()
        try:
            status, body = await _stream_upload(url, who.key, 16 * limit)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await runner.cleanup()
    assert (status, body) == (413, errors.error_body(errors.TOO_LARGE))
    # 32 MiB sent; the front held at most the limit (plus buffers), never the whole body.
    assert peak < 2 * limit, peak


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.envoy
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.skipif("envoy" not in FRONTS, reason="Envoy front not selected")
async def test_envoy_memory_stays_bounded(ustack: Stack) -> None:
    limit = GatewayConfig().max_upload_bytes
    who = await make_tenant(ustack.service)
    front = await EnvoyFront.start(ustack.service.port)
    try:
        before = _peak_rss(front.pid)
        status, body = await _stream_upload(front.base_url + EDITS, who.key, 4 * limit)
        await asyncio.sleep(0)
        grown = _peak_rss(front.pid) - before
    finally:
        await front.stop()
    assert (status, body) == (413, errors.error_body(errors.TOO_LARGE))
    # 240 MiB sent; Envoy held about one limit's worth (the transcoder's buffer) at most.
    assert grown < limit + 32 * MiB, grown


# --- the committed configuration ------------------------------------------------------------


def test_envoy_upload_routes_have_the_aiohttp_fronts_limit() -> None:
    config = yaml.safe_load(ENVOY_YAML.read_text())
    [listener] = config["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [transcoder] = [f for f in hcm["http_filters"] if f["name"].endswith("grpc_json_transcoder")]
    routes = {
        r["match"].get("path") or r["match"].get("prefix"): r
        for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
    }
    limit = GatewayConfig().max_upload_bytes
    for path in (EDITS, VARIATIONS):
        upload_route = routes[path]
        # The transcoder holds an upload to send it: its limit is the route's limit...
        per_route = upload_route["typed_per_filter_config"][
            "envoy.filters.http.grpc_json_transcoder"
        ]
        assert per_route == transcoder["typed_config"] | {"max_request_body_size": limit}
        # ...and the route's own buffer limit matches, should another filter buffer it.
        assert upload_route["request_body_buffer_limit"] == limit
        assert upload_route["route"] == routes["/"]["route"]
    # Generation bodies keep the 1 MiB limit; an upload fits in one gRPC message.
    assert transcoder["typed_config"]["max_request_body_size"] == GatewayConfig().max_body_bytes
    assert limit + MiB <= GatewayConfig().max_message_bytes == Config().max_message_bytes
