"""`stream: true` end to end: SSE through both fronts (official SDK, raw bytes), the
StreamImages RPC, errors before and after the first event, and the money of each."""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import grpc
import openai
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc
from PIL import Image

from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk, strict_sdk
from tests.rest import Reply, assert_error, call

PROMPT = "a heron in the reeds"
BODY: dict[str, Any] = {
    "model": "local",
    "prompt": PROMPT,
    "size": "256x256",
    "stream": True,
    "partial_images": 2,
}
CREDIT = 1_000_000
LOCAL_PRICE = 1000  # the local model, 256x256 standard
EVENT_FIELDS = ["type", "b64_json", "partial_image_index", "background", "created_at"]
EVENT_FIELDS += ["output_format", "quality", "size"]


def sse_events(reply: Reply) -> list[dict[str, Any]]:
    """The events of an SSE body, checking OpenAI's framing: `event: T\\ndata: J\\n\\n`
    with T == J's type, and nothing else."""
    assert reply.status == 200, reply.body[:500]
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert reply.headers.get("x-request-id")
    for name in reply.headers:
        assert not name.lower().startswith(("grpc-", "imagegate-")), name
    assert reply.body.endswith(b"\n\n")
    events = []
    for block in reply.body[:-2].split(b"\n\n"):
        event_line, data_line = block.split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: "), block[:200]
        data = json.loads(data_line[len(b"data: ") :])
        assert data["type"] == event_line[len(b"event: ") :].decode()
        events.append(data)
    return events


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert image.format == "PNG"
    return image


def same_second(body: bytes) -> bytes:
    """created_at is the clock's second, which two requests may not share."""
    return re.sub(rb'"created_at":\d+', b'"created_at":0', body)


async def test_sdk_iterates_previews_then_the_image(
    base_url: str, stack: Stack, tenant: Tenant
) -> None:
    client = strict_sdk(base_url, tenant.key)  # every event validated against the SDK's types
    stream = await client.images.generate(
        model="local", prompt=PROMPT, size="256x256", stream=True, partial_images=2
    )
    events = [event async for event in stream]
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    previews, done = events[:2], events[2]
    assert [getattr(e, "partial_image_index", None) for e in previews] == [0, 1]
    for event in events:
        assert png(event.b64_json).size == (256, 256)
        assert (event.background, event.output_format, event.size) == ("opaque", "png", "256x256")
        assert event.quality == "auto"  # the local model's "standard" is not OpenAI's
    assert done.type == "image_generation.completed"
    assert done.usage.total_tokens == 0 and done.usage.input_tokens_details.text_tokens == 0
    # The streamed image is the one a unary request draws.
    unary = await sdk(base_url, tenant.key).images.generate(
        model="local", prompt=PROMPT, size="256x256", response_format="b64_json"
    )
    assert base64.b64decode(done.b64_json) == base64.b64decode(unary.data[0].b64_json or "")
    # Previews are free: one streamed image and one unary image.
    assert await balance(stack.service, tenant.account) == CREDIT - 2 * LOCAL_PRICE


async def test_raw_events_have_openais_shape(base_url: str, stack: Stack, tenant: Tenant) -> None:
    reply = await call("POST", f"{base_url}/v1/images/generations", key=tenant.key, json_body=BODY)
    events = sse_events(reply)
    completed_fields = [f for f in EVENT_FIELDS if f != "partial_image_index"] + ["usage"]
    assert [list(e) for e in events] == [EVENT_FIELDS, EVENT_FIELDS, completed_fields]
    completed = events[2]
    assert completed["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "input_tokens": 0,
        "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
        "output_tokens": 0,
    }
    assert all(len(e["b64_json"]) % 4 == 0 for e in events)  # standard padded base64
    assert await balance(stack.service, tenant.account) == CREDIT - LOCAL_PRICE


@pytest.mark.skipif("envoy" not in FRONTS, reason="compares the two fronts")
async def test_both_fronts_write_the_same_bytes(stack: Stack, tenant: Tenant) -> None:
    bodies = []
    for front in ("aiohttp", "envoy"):
        url = f"{stack.fronts[front]}/v1/images/generations"
        for body in (BODY, {**BODY, "n": 2, "output_format": "webp", "background": "transparent"}):
            reply = await call("POST", url, key=tenant.key, json_body=body)
            sse_events(reply)
            # Event by event: n images come in the order they are ready.
            bodies.append(sorted(same_second(reply.body).split(b"\n\n")))
    assert bodies[:2] == bodies[2:]


async def test_several_images_stream_one_completed_event_each(
    base_url: str, stack: Stack, tenant: Tenant
) -> None:
    client = strict_sdk(base_url, tenant.key)
    stream = await client.images.generate(
        model="local", prompt=PROMPT, size="256x256", n=3, stream=True, partial_images=2
    )
    events = [event async for event in stream]
    # No previews for n > 1: an event does not say which image it previews.
    assert [e.type for e in events] == ["image_generation.completed"] * 3
    assert len({base64.b64decode(e.b64_json) for e in events}) == 3
    assert await balance(stack.service, tenant.account) == CREDIT - 3 * LOCAL_PRICE


async def test_grpc_streams_one_message_per_event(
    stack: Stack, tenant: Tenant, grpc_stub: images_pb2_grpc.ImageServiceStub
) -> None:
    request = images_pb2.GenerateImagesRequest(
        model="local", prompt=PROMPT, size="256x256", partial_images=3
    )
    metadata = [("authorization", f"Bearer {tenant.key}")]
    messages = [m async for m in grpc_stub.StreamImages(request, metadata=metadata)]
    assert [(m.type, m.HasField("partial_image_index")) for m in messages] == [
        ("image_generation.partial_image", True),
        ("image_generation.partial_image", True),
        ("image_generation.partial_image", True),
        ("image_generation.completed", False),
    ]
    assert [m.partial_image_index for m in messages[:3]] == [0, 1, 2]
    for message in messages:
        assert message.b64_json[:8] == b"\x89PNG\r\n\x1a\n"  # raw bytes over gRPC
        assert not message.HasField("error")
    assert messages[3].HasField("usage") and not messages[0].HasField("usage")
    assert await balance(stack.service, tenant.account) == CREDIT - LOCAL_PRICE


async def test_grpc_unary_call_refuses_stream(
    tenant: Tenant, grpc_stub: images_pb2_grpc.ImageServiceStub
) -> None:
    request = images_pb2.GenerateImagesRequest(model="local", prompt=PROMPT, stream=True)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await grpc_stub.GenerateImages(
            request, metadata=[("authorization", f"Bearer {tenant.key}")]
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "StreamImages" in (raised.value.details() or "")


INVALID = ("invalid_request_error", "invalid_value")
STREAM_ERRORS: list[tuple[dict[str, Any], int, str, str, str | None]] = [
    ({**BODY, "partial_images": 4}, 400, *INVALID, "partial_images"),
    ({**BODY, "response_format": "url"}, 400, *INVALID, "response_format"),
    ({**BODY, "model": "dall-e-9"}, 400, "invalid_request_error", "model_not_found", "model"),
    ({**BODY, "size": "1x1"}, 400, *INVALID, "size"),
]


@pytest.mark.parametrize(("body", "status", "type_", "code", "param"), STREAM_ERRORS)
async def test_errors_before_the_first_event_are_ordinary_responses(
    base_url: str,
    stack: Stack,
    tenant: Tenant,
    body: dict[str, Any],
    status: int,
    type_: str,
    code: str,
    param: str | None,
) -> None:
    url = f"{base_url}/v1/images/generations"
    assert_error(
        await call("POST", url, key=tenant.key, json_body=body), status, type_, code, param
    )
    with pytest.raises(openai.BadRequestError):
        await sdk(base_url, tenant.key).images.generate(**body)
    assert await balance(stack.service, tenant.account) == CREDIT


async def test_key_and_balance_errors_before_the_first_event(base_url: str, stack: Stack) -> None:
    url = f"{base_url}/v1/images/generations"
    assert_error(
        await call("POST", url, json_body=BODY), 401, "invalid_request_error", "invalid_api_key"
    )
    broke = await make_tenant(stack.service, credit_usd="0")
    reply = await call("POST", url, key=broke.key, json_body=BODY)
    assert_error(reply, 402, "insufficient_quota", "insufficient_quota")
    with pytest.raises(openai.APIStatusError) as raised:
        await sdk(base_url, broke.key).images.generate(**BODY)
    assert raised.value.status_code == 402


async def test_partial_images_without_stream_is_refused(base_url: str, tenant: Tenant) -> None:
    body = {**BODY, "stream": False}
    reply = await call("POST", f"{base_url}/v1/images/generations", key=tenant.key, json_body=body)
    assert_error(reply, 400, "invalid_request_error", "invalid_value", "partial_images")


async def test_the_streaming_rule_s_internal_path_is_not_public(
    base_url: str, tenant: Tenant
) -> None:
    url = f"{base_url}/v1/images/generations:stream"
    reply = await call("POST", url, key=tenant.key, json_body=BODY)
    error = assert_error(reply, 404, "invalid_request_error", "unknown_url")
    assert error["message"] == "Invalid URL (POST /v1/images/generations:stream)"
