"""The REST contract, run against both fronts (aiohttp and Envoy) with one set of expectations."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket

import grpc
import openai
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc
from PIL import Image

from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service.server import message_size_options
from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk, strict_sdk
from tests.rest import assert_error, call

PROMPT = "a lighthouse at dusk, watercolour"


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(("n", "fmt"), [(1, "png"), (3, "png"), (2, "webp"), (1, "jpeg")])
async def test_sdk_generate_url(
    base_url: str, stack: Stack, tenant: Tenant, n: int, fmt: str
) -> None:
    client = sdk(base_url, tenant.key)
    result = await client.images.generate(
        model="local",
        prompt=PROMPT,
        n=n,
        size="512x512",
        response_format="url",
        output_format=fmt,  # type: ignore[arg-type]
    )
    assert len(result.data) == n
    for item in result.data:
        assert item.b64_json is None
        assert item.url and item.url.startswith(base_url + "/v1/images/files/")
        assert item.revised_prompt and PROMPT in item.revised_prompt
        reply = await call("GET", item.url)  # the signed URL is the credential: no key
        assert reply.status == 200
        assert reply.headers["Content-Type"] == f"image/{fmt}"
        image = _image(reply.body)
        assert (image.format, image.size) == (fmt.upper(), (512, 512))
    # Distinct images (index varies), all charged: 1000 micro-USD each.
    assert len({item.url for item in result.data}) == n
    assert await balance(stack.service, tenant.account) == 1_000_000 - n * 1000


@pytest.mark.parametrize(("n", "fmt", "mime"), [(1, "webp", "WEBP"), (3, "jpeg", "JPEG")])
async def test_sdk_generate_b64(base_url: str, tenant: Tenant, n: int, fmt: str, mime: str) -> None:
    client = sdk(base_url, tenant.key)
    result = await client.images.generate(
        model="local",
        prompt=PROMPT,
        n=n,
        size="1024x1536",
        response_format="b64_json",
        output_format=fmt,  # type: ignore[arg-type]
    )
    assert len(result.data) == n
    for item in result.data:
        assert item.url is None and item.b64_json
        image = _image(base64.b64decode(item.b64_json, validate=True))
        assert (image.format, image.size) == (mime, (1024, 1536))
    # "standard" is not one of OpenAI's response qualities: left out.
    assert (result.size, result.quality, result.output_format) == ("1024x1536", None, fmt)


async def test_models_list(base_url: str, tenant: Tenant) -> None:
    models = await sdk(base_url, tenant.key).models.list()
    ids = [m.id for m in models.data]
    assert "local" in ids
    local = next(m for m in models.data if m.id == "local")
    assert (local.object, local.owned_by) == ("model", "imagegate")
    assert isinstance(local.created, int)


async def test_models_list_respects_key_allowlist(base_url: str, stack: Stack) -> None:
    limited = await make_tenant(stack.service, models=("nonexistent-model",))
    reply = await call("GET", f"{base_url}/v1/models", key=limited.key)
    assert reply.status == 200
    assert reply.json() == {"object": "list", "data": []}


async def test_exact_json_shape(base_url: str, tenant: Tenant) -> None:
    reply = await call(
        "POST",
        f"{base_url}/v1/images/generations",
        key=tenant.key,
        json_body={
            "model": "local",
            "prompt": PROMPT,
            "size": "256x256",
            "response_format": "b64_json",
        },
    )
    assert reply.status == 200, reply.body[:300]
    assert reply.headers["Content-Type"] == "application/json"
    body = reply.json()
    # quality "standard" and size 256x256 are not OpenAI values: left out.
    assert list(body) == ["created", "data", "usage", "background", "output_format"]
    assert (body["background"], body["output_format"]) == ("opaque", "png")
    assert isinstance(body["created"], int)  # a number, not proto3's string for 64-bit ints
    # Both vocabularies, every counter printed, in field order on both fronts.
    assert list(body["usage"].items()) == [
        ("prompt_tokens", 0),
        ("completion_tokens", 0),
        ("total_tokens", 0),
        ("input_tokens", 0),
        ("input_tokens_details", {"text_tokens": 0, "image_tokens": 0}),
        ("output_tokens", 0),
    ]
    assert list(body["usage"]["input_tokens_details"]) == ["text_tokens", "image_tokens"]
    (item,) = body["data"]
    assert set(item) == {"b64_json", "revised_prompt"}
    assert len(item["b64_json"]) % 4 == 0  # standard padded base64
    assert _image(base64.b64decode(item["b64_json"], validate=True)).size == (256, 256)
    for name in reply.headers:
        assert not name.lower().startswith("grpc-"), name


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
async def test_strict_sdk_validates_the_response(
    base_url: str, tenant: Tenant, response_format: str
) -> None:
    # Strict mode checks required fields (usage.input_tokens...) and Literal values.
    client = strict_sdk(base_url, tenant.key)
    for size in ("1024x1024", "256x256"):
        result = await client.images.generate(
            model="local",
            prompt=PROMPT,
            size=size,  # type: ignore[arg-type]
            quality="auto",
            response_format=response_format,  # type: ignore[arg-type]
        )
        (item,) = result.data or []
        assert (item.url is not None) == (response_format == "url")
        assert (item.b64_json is not None) == (response_format == "b64_json")
        assert result.usage is not None
        assert (result.usage.input_tokens, result.usage.output_tokens) == (0, 0)
        assert result.usage.input_tokens_details.text_tokens == 0
        assert result.size == (size if size == "1024x1024" else None)
    model = await client.models.retrieve("local")
    assert model.id == "local"
    assert "local" in [m.id async for m in client.models.list()]


async def test_quality_auto_is_the_model_default(base_url: str, stack: Stack) -> None:
    tenant = await make_tenant(stack.service)
    url = f"{base_url}/v1/images/generations"
    body = {"model": "local", "prompt": PROMPT, "size": "256x256", "response_format": "b64_json"}
    auto = await call("POST", url, key=tenant.key, json_body={**body, "quality": "auto"})
    assert auto.status == 200, auto.body[:300]
    default = await call("POST", url, key=tenant.key, json_body=body)
    # The same image as with no quality at all (the renderer is deterministic)...
    assert auto.json()["data"] == default.json()["data"]
    # ...at the default quality's price, and not reported ("standard" is not OpenAI's).
    assert await balance(stack.service, tenant.account) == 1_000_000 - 2 * 1000
    assert "quality" not in auto.json()
    result = await sdk(base_url, tenant.key).images.generate(
        model="local", prompt=PROMPT, size="256x256", quality="auto"
    )
    assert len(result.data or []) == 1


@pytest.mark.parametrize(
    ("request_", "reported"),
    [
        (
            {"size": "1024x1024", "output_format": "webp", "background": "transparent"},
            {"size": "1024x1024", "output_format": "webp", "background": "transparent"},
        ),
        (
            {"size": "1536x1024", "quality": "hd", "output_format": "jpeg"},
            {"size": "1536x1024", "output_format": "jpeg", "background": "opaque"},
        ),
        (
            {"size": "512x512", "background": "auto"},
            {"output_format": "png", "background": "opaque"},
        ),
    ],
)
async def test_reported_fields_hold_only_openai_values(
    base_url: str, tenant: Tenant, request_: dict[str, str], reported: dict[str, str]
) -> None:
    reply = await call(
        "POST",
        f"{base_url}/v1/images/generations",
        key=tenant.key,
        json_body={"model": "local", "prompt": PROMPT, "response_format": "b64_json", **request_},
    )
    assert reply.status == 200, reply.body[:300]
    body = reply.json()
    fields = ("background", "output_format", "quality", "size")
    assert {name: body[name] for name in fields if name in body} == reported


async def test_models_retrieve(base_url: str, tenant: Tenant) -> None:
    model = await sdk(base_url, tenant.key).models.retrieve("local")
    assert (model.id, model.object, model.owned_by) == ("local", "model", "imagegate")
    listed = await sdk(base_url, tenant.key).models.list()
    assert model == next(m for m in listed.data if m.id == "local")


async def test_models_retrieve_unknown_or_hidden_is_404(base_url: str, stack: Stack) -> None:
    tenant = await make_tenant(stack.service)
    limited = await make_tenant(stack.service, models=("some-other-model",))
    messages = []
    # A model that does not exist, and one that exists but this key may not use.
    for key, model in ((tenant.key, "dall-e-9"), (limited.key, "local")):
        reply = await call("GET", f"{base_url}/v1/models/{model}", key=key)
        error = assert_error(reply, 404, "invalid_request_error", "model_not_found")
        messages.append(error["message"].replace(model, "MODEL"))
        with pytest.raises(openai.NotFoundError) as raised:
            await sdk(base_url, key).models.retrieve(model)
        assert raised.value.code == "model_not_found"
    # The same words for both: the limited key cannot tell "local" exists.
    assert messages[0] == messages[1]
    reply = await call("GET", f"{base_url}/v1/models/local")
    assert_error(reply, 401, "invalid_request_error", "invalid_api_key")


@pytest.mark.parametrize(("allowed", "listed"), [(("local",), "local"), (("no-such-model",), None)])
async def test_unknown_model_lists_only_the_keys_models(
    base_url: str, stack: Stack, allowed: tuple[str, ...], listed: str | None
) -> None:
    limited = await make_tenant(stack.service, models=allowed)
    reply = await call(
        "POST",
        f"{base_url}/v1/images/generations",
        key=limited.key,
        json_body={"model": "dall-e-9", "prompt": PROMPT},
    )
    error = assert_error(reply, 400, "invalid_request_error", "model_not_found", "model")
    if listed is None:
        # Nothing this key may use exists: no list, and no other model's name.
        assert "Available" not in error["message"]
        assert "local" not in error["message"]
    else:
        assert error["message"].endswith(f"Available models: {listed}.")


# Characters Envoy's JSON printer escapes beyond what Python's json module does
# (gateway/json_text.py), plus plain non-ASCII that both leave as UTF-8.
TRICKY = 'é<>&"\\ \x7f\x85 \u00ad\u200b\u202e\ufeff \U0001d173\U000e0041 ünï ☃ 😀 /'


async def _both(stack: Stack, method: str, path: str, **kwargs: object) -> list[bytes]:
    bodies = []
    for front in ("aiohttp", "envoy"):
        reply = await call(method, f"{stack.fronts[front]}{path}", **kwargs)  # type: ignore[arg-type]
        body = reply.body
        if reply.status == 200 and body.startswith(b'{"created":'):
            created = str(reply.json()["created"]).encode()
            body = body.replace(b'"created":' + created, b'"created":0', 1)
        bodies.append(bytes([reply.status // 100]) + body)
    return bodies


async def test_fronts_answer_byte_for_byte_the_same(stack: Stack, tenant: Tenant) -> None:
    if "envoy" not in stack.fronts:
        pytest.skip("IMAGEGATE_TEST_FRONTS excludes envoy")
    gen = "/v1/images/generations"
    cases = [
        {
            "model": "local",
            "prompt": TRICKY,
            "size": "256x256",
            "response_format": "b64_json",
            "n": 2,
        },
        {"model": "local", "prompt": PROMPT, "size": TRICKY},  # echoed in the error message
        {"model": TRICKY, "prompt": PROMPT},
    ]
    for body in cases:
        aiohttp_body, envoy_body = await _both(stack, "POST", gen, key=tenant.key, json_body=body)
        assert aiohttp_body == envoy_body
    for path in ("/v1/models", "/v1/models/local", "/v1/models/dall-e-9"):
        aiohttp_body, envoy_body = await _both(stack, "GET", path, key=tenant.key)
        assert aiohttp_body == envoy_body
    limited = await make_tenant(stack.service, models=("other",))
    aiohttp_body, envoy_body = await _both(stack, "GET", "/v1/models/local", key=limited.key)
    assert aiohttp_body == envoy_body
    assert aiohttp_body.startswith(b"\x04")  # the 404, not a model


async def test_unknown_fields_are_ignored(base_url: str, tenant: Tenant) -> None:
    reply = await call(
        "POST",
        f"{base_url}/v1/images/generations",
        key=tenant.key,
        json_body={
            "model": "local",
            "prompt": PROMPT,
            "size": "256x256",
            "not_a_field": 1,
            "extra": {"nested": [1, 2]},
        },
    )
    assert reply.status == 200, reply.body[:300]
    assert len(reply.json()["data"]) == 1


async def test_request_id_is_echoed_or_generated(base_url: str, tenant: Tenant) -> None:
    sent = await call(
        "GET", f"{base_url}/v1/models", key=tenant.key, headers={"x-request-id": "trace-abc-123"}
    )
    assert sent.headers["x-request-id"] == "trace-abc-123"
    fresh = await call("GET", f"{base_url}/v1/models", key=tenant.key)
    assert len(fresh.headers["x-request-id"]) >= 16
    error = await call("GET", f"{base_url}/v1/nope", headers={"x-request-id": "err-1"})
    assert error.headers["x-request-id"] == "err-1"


# Error rows: (json body, status, type, code, param, SDK exception)
PARAM_ERRORS = [
    (
        {"model": "local"},
        400,
        "invalid_request_error",
        "missing_required_parameter",
        "prompt",
        openai.BadRequestError,
    ),
    (
        {"model": "local", "prompt": PROMPT, "size": "999x999"},
        400,
        "invalid_request_error",
        "invalid_value",
        "size",
        openai.BadRequestError,
    ),
    (
        {"model": "local", "prompt": PROMPT, "n": 11},
        400,
        "invalid_request_error",
        "invalid_value",
        "n",
        openai.BadRequestError,
    ),
    (
        {"model": "local", "prompt": PROMPT, "quality": "ultra"},
        400,
        "invalid_request_error",
        "invalid_value",
        "quality",
        openai.BadRequestError,
    ),
    (
        {"model": "local", "prompt": PROMPT, "response_format": "gif"},
        400,
        "invalid_request_error",
        "invalid_value",
        "response_format",
        openai.BadRequestError,
    ),
    (
        {"model": "local", "prompt": PROMPT, "output_format": "jpeg", "background": "transparent"},
        400,
        "invalid_request_error",
        "invalid_value",
        "background",
        openai.BadRequestError,
    ),
    (
        {"model": "local", "prompt": PROMPT, "partial_images": 2},
        400,
        "invalid_request_error",
        "invalid_value",
        "partial_images",
        openai.BadRequestError,
    ),
    (
        {"model": "local", "prompt": "x" * 32001},
        400,
        "invalid_request_error",
        "invalid_value",
        "prompt",
        openai.BadRequestError,
    ),
    (
        {"model": "dall-e-9", "prompt": PROMPT},
        400,
        "invalid_request_error",
        "model_not_found",
        "model",
        openai.BadRequestError,
    ),
]


@pytest.mark.parametrize(("body", "status", "type_", "code", "param", "exc"), PARAM_ERRORS)
async def test_parameter_errors(
    base_url: str,
    stack: Stack,
    tenant: Tenant,
    body: dict[str, object],
    status: int,
    type_: str,
    code: str,
    param: str,
    exc: type[openai.APIStatusError],
) -> None:
    url = f"{base_url}/v1/images/generations"
    assert_error(
        await call("POST", url, key=tenant.key, json_body=body), status, type_, code, param
    )
    with pytest.raises(exc) as raised:
        # The SDK insists on a prompt argument; an empty one is "missing" to the service too.
        await sdk(base_url, tenant.key).images.generate(**{"prompt": "", **body})  # type: ignore[arg-type]
    assert raised.value.status_code == status
    assert await balance(stack.service, tenant.account) == 1_000_000  # never charged


async def test_missing_and_malformed_keys_are_401(base_url: str, tenant: Tenant) -> None:
    url = f"{base_url}/v1/images/generations"
    body = {"model": "local", "prompt": PROMPT}
    assert_error(
        await call("POST", url, json_body=body), 401, "invalid_request_error", "invalid_api_key"
    )
    for header in (
        "Bearer sk-short",
        "Basic abc",
        "Bearer " + "sk-" + "A" * 43,
        tenant.key,
    ):  # the last one without the Bearer scheme
        reply = await call("POST", url, json_body=body, headers={"Authorization": header})
        error = assert_error(reply, 401, "invalid_request_error", "invalid_api_key")
        assert tenant.key not in error["message"]
    with pytest.raises(openai.AuthenticationError):
        await sdk(base_url, "sk-" + "B" * 43).images.generate(model="local", prompt=PROMPT)
    assert_error(
        await call("GET", f"{base_url}/v1/models"), 401, "invalid_request_error", "invalid_api_key"
    )


async def test_revoked_key_is_401(base_url: str, stack: Stack) -> None:
    tenant = await make_tenant(stack.service)
    client = sdk(base_url, tenant.key)
    await client.images.generate(model="local", prompt=PROMPT, size="256x256")
    assert await stack.service.store.revoke_key(tenant.key_id)
    # Found keys are trusted for up to key_cache_ttl_s (1 s): refused after it.
    await asyncio.sleep(stack.service.config.key_cache_ttl_s)
    with pytest.raises(openai.AuthenticationError) as raised:
        await client.images.generate(model="local", prompt=PROMPT, size="256x256")
    assert raised.value.code == "invalid_api_key"
    assert await balance(stack.service, tenant.account) == 1_000_000 - 1000


async def test_model_not_allowed_is_403(base_url: str, stack: Stack) -> None:
    limited = await make_tenant(stack.service, models=("some-other-model",))
    reply = await call(
        "POST",
        f"{base_url}/v1/images/generations",
        key=limited.key,
        json_body={"model": "local", "prompt": PROMPT},
    )
    assert_error(reply, 403, "invalid_request_error", "model_not_allowed", "model")
    with pytest.raises(openai.PermissionDeniedError):
        await sdk(base_url, limited.key).images.generate(model="local", prompt=PROMPT)
    assert await balance(stack.service, limited.account) == 1_000_000


async def test_insufficient_balance_is_402(base_url: str, stack: Stack) -> None:
    poor = await make_tenant(stack.service, credit_usd="0.0025")  # 2 images of 1000 µ$
    url = f"{base_url}/v1/images/generations"
    reply = await call(
        "POST", url, key=poor.key, json_body={"model": "local", "prompt": PROMPT, "n": 3}
    )
    assert_error(reply, 402, "insufficient_quota", "insufficient_quota")
    with pytest.raises(openai.APIStatusError) as raised:
        await sdk(base_url, poor.key).images.generate(model="local", prompt=PROMPT, n=3)
    assert raised.value.status_code == 402
    assert type(raised.value) is openai.APIStatusError
    assert await balance(stack.service, poor.account) == 2500


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b'"a string"', b'{"n": "abc"}', b'{"prompt": 5.5, "n": 1.5}']
)
async def test_malformed_json_is_400(
    base_url: str, stack: Stack, tenant: Tenant, raw: bytes
) -> None:
    reply = await call(
        "POST",
        f"{base_url}/v1/images/generations",
        key=tenant.key,
        body=raw,
        headers={"Content-Type": "application/json"},
    )
    assert_error(reply, 400, "invalid_request_error", "invalid_json")
    assert await balance(stack.service, tenant.account) == 1_000_000


async def test_oversized_body_is_413(base_url: str, stack: Stack, tenant: Tenant) -> None:
    body = json.dumps({"model": "local", "prompt": "x" * (1024 * 1024 + 10)}).encode()
    reply = await call(
        "POST",
        f"{base_url}/v1/images/generations",
        key=tenant.key,
        body=body,
        headers={"Content-Type": "application/json"},
    )
    assert_error(reply, 413, "invalid_request_error", "request_too_large")
    assert await balance(stack.service, tenant.account) == 1_000_000


async def test_unknown_route_is_404_and_wrong_method_405(base_url: str, tenant: Tenant) -> None:
    reply = await call("POST", f"{base_url}/v1/images/nope?x=1", key=tenant.key, json_body={})
    error = assert_error(reply, 404, "invalid_request_error", "unknown_url")
    assert error["message"] == "Invalid URL (POST /v1/images/nope)"
    reply = await call("GET", f"{base_url}/v1/images/generations", key=tenant.key)
    error = assert_error(reply, 405, "invalid_request_error", "method_not_allowed")
    assert error["message"] == "Method not allowed (GET /v1/images/generations)"
    assert reply.headers["Allow"] == "POST"
    reply = await call("DELETE", f"{base_url}/v1/models", key=tenant.key)
    assert_error(reply, 405, "invalid_request_error", "method_not_allowed")
    assert reply.headers["Allow"] == "GET"


async def test_tampered_image_url_is_404(base_url: str, tenant: Tenant) -> None:
    result = await sdk(base_url, tenant.key).images.generate(
        model="local", prompt=PROMPT, size="256x256"
    )
    url = result.data[0].url
    assert url is not None
    assert (await call("GET", url)).status == 200
    sig_at = url.index("signature=") + len("signature=")
    flipped = "0" if url[sig_at] != "0" else "1"
    tampered = [
        url[:sig_at] + flipped + url[sig_at + 1 :],
        url.replace("expires=", "expires=9"),
        url.split("?")[0],
        url.replace("/files/", "/files/x"),
    ]
    for bad in tampered:
        assert_error(await call("GET", bad), 404, "invalid_request_error", "image_not_found")


@pytest.mark.parametrize("front", FRONTS)
async def test_service_unreachable_is_503(front: str, tenant: Tenant) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    if front == "aiohttp":
        runner = await start_gateway(GatewayConfig(grpc_target=f"127.0.0.1:{dead}"), port=0)
        try:
            reply = await call(
                "GET", f"http://127.0.0.1:{bound_port(runner)}/v1/models", key=tenant.key
            )
        finally:
            await runner.cleanup()
    else:
        from tests.envoy_harness import envoy_front

        async with envoy_front(dead) as url:
            reply = await call("GET", f"{url}/v1/models", key=tenant.key)
    assert_error(reply, 503, "server_error", "service_unavailable")


async def test_large_images_come_back_intact(base_url: str, stack: Stack) -> None:
    tenant = await make_tenant(stack.service)
    result = await sdk(base_url, tenant.key).images.generate(
        model="local",
        prompt=PROMPT,
        n=4,
        size="1792x1024",
        quality="hd",  # type: ignore[arg-type]
        response_format="b64_json",
    )
    blobs = [base64.b64decode(item.b64_json or "", validate=True) for item in result.data]
    assert len(blobs) == 4
    # The renderer is deterministic, so the gRPC answer is the reference bytes.
    async with grpc.aio.insecure_channel(
        stack.grpc_target, options=message_size_options(64 * 1024 * 1024)
    ) as channel:
        reference = await images_pb2_grpc.ImageServiceStub(channel).GenerateImages(
            images_pb2.GenerateImagesRequest(
                model="local",
                prompt=PROMPT,
                n=4,
                size="1792x1024",
                quality="hd",
                response_format="b64_json",
            ),
            metadata=[("authorization", f"Bearer {tenant.key}")],
        )
    for blob, item in zip(blobs, reference.data, strict=True):
        assert len(blob) >= 1_500_000
        assert blob == item.b64_json
        assert _image(blob).size == (1792, 1024)


async def test_client_hanging_up_is_not_charged(base_url: str, stack: Stack) -> None:
    tenant = await make_tenant(stack.service)
    slow = {
        "model": "local",
        "prompt": PROMPT,
        "n": 10,
        "size": "1792x1024",
        "quality": "hd",
        "response_format": "b64_json",
    }  # renders for a second or more
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await call("POST", f"{base_url}/v1/images/generations", key=tenant.key, json_body=slow)
    async with asyncio.timeout(20):
        # Polling the store: the release happens in the service, with no event to await.
        while True:
            usage = await stack.service.store.usage(tenant.account)
            if usage and all(u.status != "held" for u in usage):
                break
            await asyncio.sleep(0.05)
    assert [u.status for u in usage] == ["released"]
    assert await balance(stack.service, tenant.account) == 1_000_000
