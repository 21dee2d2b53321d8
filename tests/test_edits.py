"""Edits and variations end to end on the local renderer: the official SDK through both
fronts, the JSON image_url form, and gRPC clients sending the same bodies."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import grpc
import pytest
from google.api import httpbody_pb2
from imagegate.v1 import images_pb2, images_pb2_grpc
from PIL import Image, ImageChops

from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk, start_stack
from tests.rest import assert_error, call
from tests.test_grpc import _reason
from tests.upload_helpers import data_url, mask, multipart, png

PROMPT = "a paper boat on a pond"
SOURCE = png((256, 256), (200, 40, 40))
SECOND = png((128, 96), (40, 200, 40))
HOLE = mask((256, 256), (0, 0, 127, 255))
CREDIT = 1_000_000


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


async def test_sdk_edit_one_image(base_url: str, stack: Stack, tenant: Tenant) -> None:
    client = sdk(base_url, tenant.key)
    result = await client.images.edit(
        model="local",
        image=("boat.png", SOURCE, "image/png"),
        prompt=PROMPT,
        size="512x512",
        response_format="b64_json",
    )
    [item] = result.data
    image = decode(base64.b64decode(item.b64_json or ""))
    assert (image.format, image.size) == ("PNG", (512, 512))
    assert item.revised_prompt and PROMPT in item.revised_prompt
    assert await balance(stack.service, tenant.account) == CREDIT - 1000


async def test_sdk_edit_several_images_with_mask(
    base_url: str, stack: Stack, tenant: Tenant
) -> None:
    client = sdk(base_url, tenant.key)
    result = await client.images.edit(
        model="local",
        image=[("a.png", SOURCE, "image/png"), ("b.png", SECOND, "image/png")],
        mask=("mask.png", HOLE, "image/png"),
        prompt=PROMPT,
        n=2,
        size="256x256",
        output_format="webp",
    )
    assert len(result.data) == 2
    for item in result.data:
        assert item.url and item.url.startswith(base_url + "/v1/images/files/")
        reply = await call("GET", item.url)
        assert reply.headers["Content-Type"] == "image/webp"
        assert decode(reply.body).size == (256, 256)
    assert len({item.url for item in result.data}) == 2
    assert (result.size, result.output_format) == (None, "webp")  # 256x256: not OpenAI's
    assert await balance(stack.service, tenant.account) == CREDIT - 2000


async def test_mask_is_honoured_through_the_front(base_url: str, tenant: Tenant) -> None:
    client = sdk(base_url, tenant.key)
    result = await client.images.edit(
        model="local",
        image=("a.png", SOURCE, "image/png"),
        mask=("mask.png", HOLE, "image/png"),
        prompt=PROMPT,
        size="256x256",
        response_format="b64_json",
    )
    out = decode(base64.b64decode(result.data[0].b64_json or "")).convert("RGB")
    original = decode(SOURCE).convert("RGB")
    kept = (128, 0, 256, 256)  # the mask's opaque half
    assert ImageChops.difference(out.crop(kept), original.crop(kept)).getbbox() is None
    assert ImageChops.difference(out.crop((0, 0, 128, 256)), original.crop((0, 0, 128, 256)))


async def test_json_image_url_form(base_url: str, stack: Stack, tenant: Tenant) -> None:
    reply = await call(
        "POST",
        f"{base_url}/v1/images/edits",
        key=tenant.key,
        json_body={
            "model": "local",
            "prompt": PROMPT,
            "images": [{"image_url": data_url(SOURCE)}, {"image_url": data_url(SECOND)}],
            "mask": {"image_url": data_url(HOLE)},
            "size": "256x256",
            "response_format": "b64_json",
        },
    )
    assert reply.status == 200, reply.body
    [item] = reply.json()["data"]
    assert decode(base64.b64decode(item["b64_json"])).size == (256, 256)
    assert await balance(stack.service, tenant.account) == CREDIT - 1000


async def test_remote_image_urls_are_refused_by_default(base_url: str, tenant: Tenant) -> None:
    reply = await call(
        "POST",
        f"{base_url}/v1/images/edits",
        key=tenant.key,
        json_body={"prompt": PROMPT, "images": [{"image_url": "https://example.com/a.png"}]},
    )
    error = assert_error(reply, 400, "invalid_request_error", "invalid_value", "images[0]")
    assert "does not fetch remote image URLs" in error["message"]


async def test_sdk_create_variation(base_url: str, stack: Stack, tenant: Tenant) -> None:
    client = sdk(base_url, tenant.key)
    # The SDK marks variations deprecated (they are dall-e-2's); they still work.
    with pytest.warns(DeprecationWarning):
        result = await client.images.create_variation(
            model="local",
            image=("boat.png", SOURCE, "image/png"),
            n=3,
            size="256x256",
            response_format="b64_json",
        )
    blobs = [base64.b64decode(item.b64_json or "") for item in result.data]
    assert len(set(blobs)) == 3
    assert {decode(b).size for b in blobs} == {(256, 256)}
    assert all(item.revised_prompt is None for item in result.data)
    assert await balance(stack.service, tenant.account) == CREDIT - 3000


async def test_grpc_clients_send_the_same_bodies(
    grpc_stub: images_pb2_grpc.ImageServiceStub, stack: Stack, tenant: Tenant
) -> None:
    ctype, body = multipart(
        [
            ("prompt", PROMPT),
            ("size", "256x256"),
            ("response_format", "b64_json"),
            ("image[]", ("a.png", SOURCE, "image/png")),
            ("image[]", ("b.png", SECOND, "image/png")),
            ("mask", ("m.png", HOLE, "image/png")),
        ]
    )
    reply = await grpc_stub.EditImages(
        images_pb2.EditImagesRequest(body=httpbody_pb2.HttpBody(content_type=ctype, data=body)),
        metadata=_auth(tenant.key),
    )
    [item] = reply.data
    assert decode(item.b64_json).size == (256, 256)  # raw bytes over gRPC
    as_json = json.dumps(
        {"prompt": PROMPT, "images": [{"image_url": data_url(SOURCE)}], "size": "256x256"}
    ).encode()
    reply = await grpc_stub.EditImages(
        images_pb2.EditImagesRequest(
            body=httpbody_pb2.HttpBody(content_type="application/json", data=as_json)
        ),
        metadata=_auth(tenant.key),
    )
    assert reply.data[0].url.startswith("http")
    ctype, body = multipart([("image", ("a.png", SOURCE, "image/png")), ("n", "2")])
    reply = await grpc_stub.CreateImageVariation(
        images_pb2.CreateImageVariationRequest(
            body=httpbody_pb2.HttpBody(content_type=ctype, data=body)
        ),
        metadata=_auth(tenant.key),
    )
    assert len(reply.data) == 2
    assert await balance(stack.service, tenant.account) == CREDIT - 4 * 1000
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await grpc_stub.EditImages(
            images_pb2.EditImagesRequest(
                body=httpbody_pb2.HttpBody(content_type=ctype, data=body[:-30])
            ),
            metadata=_auth(tenant.key),
        )
    assert _reason(raised.value) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_BODY",
        {"code": "invalid_multipart"},
    )
    # The upload RPCs parse their request themselves (off the event loop): a message
    # that is not protobuf is a bad parameter, not a crash.
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        raw = channel.unary_unary(
            "/imagegate.v1.ImageService/EditImages",
            request_serializer=None,
            response_deserializer=images_pb2.ImagesResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await raw(b"\x0a\xff\xff\xff", metadata=_auth(tenant.key))
    assert _reason(raised.value) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PARAMETER",
        {"param": "body", "code": "invalid_value"},
    )


async def test_every_front_and_grpc_draw_the_same_edit(
    stack: Stack, tenant: Tenant, grpc_stub: images_pb2_grpc.ImageServiceStub
) -> None:
    """One parser behind every door: the same body gives byte-identical images."""
    parts = [
        ("prompt", PROMPT),
        ("size", "256x256"),
        ("response_format", "b64_json"),
        ("image", ("a.png", SOURCE, "image/png")),
        ("mask", ("m.png", HOLE, "image/png")),
    ]
    ctype, body = multipart(parts)  # type: ignore[arg-type]
    drawn = set()
    for front in FRONTS:
        reply = await call(
            "POST",
            f"{stack.fronts[front]}/v1/images/edits",
            key=tenant.key,
            body=body,
            headers={"Content-Type": ctype},
        )
        drawn.add(base64.b64decode(reply.json()["data"][0]["b64_json"]))
    grpc_reply = await grpc_stub.EditImages(
        images_pb2.EditImagesRequest(body=httpbody_pb2.HttpBody(content_type=ctype, data=body)),
        metadata=_auth(tenant.key),
    )
    drawn.add(grpc_reply.data[0].b64_json)
    assert len(drawn) == 1


@pytest.mark.parametrize("path", ["/v1/images/edits", "/v1/images/variations"])
async def test_the_query_of_an_upload_binds_nothing(
    base_url: str, tenant: Tenant, path: str
) -> None:
    ctype, body = multipart([("prompt", PROMPT), ("image", ("a.png", SOURCE, "image/png"))])
    reply = await call(
        "POST",
        f"{base_url}{path}?n=5&size=256x256&body.data=x",
        key=tenant.key,
        body=body,
        headers={"Content-Type": ctype},
    )
    assert reply.status == 200, reply.body
    assert len(reply.json()["data"]) == 1


async def test_an_upload_needs_a_key(base_url: str) -> None:
    ctype, body = multipart([("prompt", PROMPT), ("image", ("a.png", SOURCE, "image/png"))])
    reply = await call(
        "POST", f"{base_url}/v1/images/edits", body=body, headers={"Content-Type": ctype}
    )
    assert_error(reply, 401, "invalid_request_error", "invalid_api_key")


# --- the key's Idempotency-Key and limits apply to uploads as to generations -----------------


async def test_an_idempotency_key_runs_an_edit_once(
    base_url: str, stack: Stack, tenant: Tenant
) -> None:
    ctype, body = multipart(
        [("prompt", PROMPT), ("size", "256x256"), ("image", ("a.png", SOURCE, "image/png"))]
    )
    headers = {"Content-Type": ctype, "Idempotency-Key": f"edit-{tenant.account}"}
    url = f"{base_url}/v1/images/edits"
    first = await call("POST", url, key=tenant.key, body=body, headers=headers)
    again = await call("POST", url, key=tenant.key, body=body, headers=headers)
    assert first.status == again.status == 200
    assert first.body == again.body  # replayed, not drawn again
    assert await balance(stack.service, tenant.account) == CREDIT - 1000
    ctype, other = multipart(
        [("prompt", "another"), ("size", "256x256"), ("image", ("a.png", SOURCE, "image/png"))]
    )
    reply = await call(
        "POST", url, key=tenant.key, body=other, headers={**headers, "Content-Type": ctype}
    )
    assert_error(reply, 409, "invalid_request_error", "idempotency_key_conflict")
    reply = await call(
        "POST",
        url,
        key=tenant.key,
        body=multipart([("prompt", PROMPT), ("stream", "true"), ("image", ("a", SOURCE, "x"))])[1],
        headers={**headers, "Content-Type": ctype, "Idempotency-Key": "streamed-edit"},
    )
    assert_error(reply, 400, "invalid_request_error", "invalid_value", "Idempotency-Key")


async def test_rate_limits_apply_to_uploads(tmp_path: Path) -> None:
    stack, closers = await start_stack(tmp_path, envoy=False, limit_rpm=1)
    try:
        tenant = await make_tenant(stack.service)
        ctype, body = multipart([("image", ("a.png", SOURCE, "image/png")), ("size", "256x256")])
        url = f"{stack.fronts['aiohttp']}/v1/images/variations"
        first = await call("POST", url, key=tenant.key, body=body, headers={"Content-Type": ctype})
        assert first.status == 200, first.body
        second = await call("POST", url, key=tenant.key, body=body, headers={"Content-Type": ctype})
        assert_error(second, 429, "requests", "rate_limit_exceeded")
        assert await balance(stack.service, tenant.account) == CREDIT - 1000
    finally:
        for close in closers:
            await close()
