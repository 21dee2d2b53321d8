"""Streamed edits (`stream` true in the upload): the official Python and Node SDKs iterate
image_edit.* events through both fronts, gRPC clients call StreamEditImages, OpenAI's
gpt-image edits stream through from the upstream, and both fronts route by one rule."""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2
from imagegate.v1 import images_pb2, images_pb2_grpc
from PIL import Image

from gateway.uploads import stream_requested
from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk
from tests.fakes.openai import FakeOpenAI
from tests.providers_harness import FAKE_ENV, model, provider, provider_stack, route
from tests.rest import assert_error, call
from tests.test_node_sdk import node, run_node  # noqa: F401 (the fixture)
from tests.upload_helpers import data_url, encode, mask, multipart, png

PROMPT = "a paper boat on a pond"
SOURCE = png((256, 256), (200, 40, 40))
HOLE = mask((256, 256), (0, 0, 127, 255))
CREDIT = 1_000_000
OPENAI_KEY = FAKE_ENV["OPENAI_API_KEY"]
AZURE_KEY = FAKE_ENV["AZURE_OPENAI_API_KEY"]
GPT_IMAGE = {
    "family": "gpt-image",
    "sizes": ["1024x1024"],
    "qualities": ["low", "medium", "high"],
    "default_quality": "low",
    "output_formats": ["png", "jpeg", "webp"],
    "edits": True,
    "token_prices": {"text_input": 5_000_000, "image_input": 10_000_000, "output": 40_000_000},
    "prices": {"low": {"1024x1024": 11000}},
}


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


async def test_sdk_streams_an_edit_with_previews(
    base_url: str, stack: Stack, tenant: Tenant
) -> None:
    client = sdk(base_url, tenant.key)
    stream = await client.images.edit(
        model="local",
        image=("a.png", SOURCE, "image/png"),
        mask=("m.png", HOLE, "image/png"),
        prompt=PROMPT,
        size="256x256",
        stream=True,
        partial_images=2,
    )
    events = [event async for event in stream]
    assert [(e.type, getattr(e, "partial_image_index", None)) for e in events] == [
        ("image_edit.partial_image", 0),
        ("image_edit.partial_image", 1),
        ("image_edit.completed", None),
    ]
    images = [decode(base64.b64decode(e.b64_json)) for e in events]
    assert {i.size for i in images} == {(256, 256)}
    # The completed image is the same edit a unary call draws (the mask's kept half).
    kept = (128, 0, 256, 256)
    assert images[-1].convert("RGB").crop(kept) == decode(SOURCE).convert("RGB").crop(kept)
    assert await balance(stack.service, tenant.account) == CREDIT - 1000  # previews are free


async def test_json_form_streams_several_images(
    base_url: str, stack: Stack, tenant: Tenant
) -> None:
    reply = await call(
        "POST",
        f"{base_url}/v1/images/edits",
        key=tenant.key,
        json_body={
            "prompt": PROMPT,
            "images": [{"image_url": data_url(SOURCE)}],
            "size": "256x256",
            "n": 2,
            "stream": True,
        },
    )
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    kinds = [line for line in reply.body.split(b"\n") if line.startswith(b"event: ")]
    assert kinds == [b"event: image_edit.completed"] * 2
    assert await balance(stack.service, tenant.account) == CREDIT - 2000


async def test_errors_before_the_first_event_are_ordinary_responses(
    base_url: str, tenant: Tenant
) -> None:
    ctype, body = multipart([("prompt", PROMPT), ("stream", "true"), ("n", "11")])
    reply = await call(
        "POST",
        f"{base_url}/v1/images/edits",
        key=tenant.key,
        body=body,
        headers={"Content-Type": ctype},
    )
    assert_error(reply, 400, "invalid_request_error", "invalid_value", "n")


def _noise_png(size: tuple[int, int]) -> bytes:
    data = random.Random(7).randbytes(size[0] * size[1] * 3)
    return encode(Image.frombytes("RGB", size, data), "PNG")


async def test_a_large_streamed_edit_has_the_upload_limit(
    base_url: str, stack: Stack, tenant: Tenant
) -> None:
    """Over the 1 MiB of JSON bodies: the streamed edit's route keeps the upload limit."""
    big = _noise_png((1024, 768))
    assert len(big) > 2 * 1024 * 1024
    client = sdk(base_url, tenant.key)
    stream = await client.images.edit(
        model="local",
        image=("big.png", big, "image/png"),
        prompt=PROMPT,
        size="256x256",
        stream=True,
    )
    assert [e.type async for e in stream] == ["image_edit.completed"]


async def test_grpc_stream_edit(
    grpc_stub: images_pb2_grpc.ImageServiceStub, stack: Stack, tenant: Tenant
) -> None:
    ctype, body = multipart(
        [
            ("prompt", PROMPT),
            ("size", "256x256"),
            ("partial_images", "1"),
            ("image", ("a.png", SOURCE, "image/png")),
        ]
    )
    call_ = grpc_stub.StreamEditImages(
        images_pb2.EditImagesRequest(body=httpbody_pb2.HttpBody(content_type=ctype, data=body)),
        metadata=[("authorization", f"Bearer {tenant.key}")],
    )
    events = [event async for event in call_]
    assert [(e.type, e.HasField("partial_image_index")) for e in events] == [
        ("image_edit.partial_image", True),
        ("image_edit.completed", False),
    ]
    assert decode(events[-1].b64_json).size == (256, 256)
    # The unary RPC refuses `stream` true: the streaming one answers it.
    ctype, body = multipart([("prompt", PROMPT), ("stream", "true"), ("image", ("a", SOURCE, "x"))])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await grpc_stub.EditImages(
            images_pb2.EditImagesRequest(body=httpbody_pb2.HttpBody(content_type=ctype, data=body)),
            metadata=[("authorization", f"Bearer {tenant.key}")],
        )
    assert "StreamEditImages" in (raised.value.details() or "")
    assert await balance(stack.service, tenant.account) == CREDIT - 1000


# --- routing: one rule on both fronts -------------------------------------------------------


def _part(
    name: str, value: str, extra: str = "", disposition: str = "Content-Disposition"
) -> bytes:
    return f'--B\r\n{disposition}: form-data; name="{name}"{extra}\r\n\r\n{value}\r\n'.encode()


IMAGE_PART = (
    b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
    b"Content-Type: image/png\r\n\r\n" + SOURCE + b"\r\n"
)
ROUTING: dict[str, tuple[bytes, bool]] = {
    "true": (_part("stream", "true"), True),
    "True": (_part("stream", "True"), True),
    "one-padded": (_part("stream", " 1 "), True),
    "part-content-type": (
        b'--B\r\nContent-Disposition: form-data; name="stream"\r\n'
        b"Content-Type: text/plain; charset=utf-8\r\n\r\ntrue\r\n",
        True,
    ),
    "lowercase-header": (_part("stream", "true", disposition="content-disposition"), True),
    "false": (_part("stream", "false"), False),
    "absent": (b"", False),
    "other-field": (_part("streamed", "true"), False),
    "filename-stream": (_part("x", "true", extra='; filename="stream"'), False),
}


@pytest.mark.parametrize(("part", "streams"), ROUTING.values(), ids=ROUTING.keys())
def test_the_routing_rule(part: bytes, streams: bool) -> None:
    body = _part("prompt", PROMPT) + part + IMAGE_PART + b"--B--\r\n"
    assert stream_requested("multipart/form-data; boundary=B", body) is streams


@pytest.mark.parametrize(("part", "streams"), ROUTING.values(), ids=ROUTING.keys())
async def test_both_fronts_route_alike(
    stack: Stack, tenant: Tenant, part: bytes, streams: bool
) -> None:
    body = _part("prompt", PROMPT) + _part("size", "256x256") + part + IMAGE_PART + b"--B--\r\n"
    answers = set()
    for front in FRONTS:
        reply = await call(
            "POST",
            f"{stack.fronts[front]}/v1/images/edits",
            key=tenant.key,
            body=body,
            headers={"Content-Type": "multipart/form-data; boundary=B"},
        )
        assert reply.status == 200, reply.body
        answers.add(reply.headers["Content-Type"].split(";")[0])
    assert answers == {"text/event-stream" if streams else "application/json"}


async def test_the_internal_path_is_not_served(base_url: str, tenant: Tenant) -> None:
    reply = await call("POST", f"{base_url}/v1/images/edits:stream", key=tenant.key, body=b"")
    assert_error(reply, 404, "invalid_request_error", "unknown_url")


# --- OpenAI gpt-image edits stream through ---------------------------------------------------


@pytest.fixture(scope="module")
async def ostack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Stack, Any]]:
    fake = FakeOpenAI(openai_key=OPENAI_KEY, azure_key=AZURE_KEY)
    await fake.start()
    try:
        async with provider_stack(
            tmp_path_factory.mktemp("openai-edit-stream"),
            providers={
                "openai": provider("openai", fake.openai_base),
                "azure": provider("azure_openai", fake.base_url),
            },
            models={"azure-gpt": model(route("azure", "gpt-image-deploy"), **GPT_IMAGE)},
            env={"OPENAI_API_KEY": OPENAI_KEY, "AZURE_OPENAI_API_KEY": AZURE_KEY},
        ) as stack:
            yield stack, fake
    finally:
        await fake.stop()


@pytest.mark.parametrize(
    ("model_id", "path"),
    [
        ("gpt-image-1", "/v1/images/edits"),
        ("azure-gpt", "/openai/deployments/gpt-image-deploy/images/edits"),
    ],
)
@pytest.mark.parametrize("front", FRONTS)
async def test_gpt_image_edit_streams_from_openai(
    ostack: tuple[Stack, FakeOpenAI], front: str, model_id: str, path: str
) -> None:
    stack, fake = ostack
    who = await make_tenant(stack.service, credit_usd="5")
    client = sdk(stack.fronts[front], who.key)
    stream = await client.images.edit(
        model=model_id,
        image=("a.png", SOURCE, "image/png"),
        prompt=PROMPT,
        quality="low",
        stream=True,
        partial_images=2,
    )
    events = [event async for event in stream]
    assert [e.type for e in events] == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    sent = fake.uploads[-1]
    assert sent.path == path
    assert (sent.fields["stream"], sent.fields["partial_images"]) == ("true", "2")
    assert [f.name for f in sent.files] == ["image[]"]
    usage = events[-1].usage
    assert usage is not None and usage.output_tokens == 272
    # Charged from the reported usage (text 5, output 40 USD per 1M tokens).
    cost = usage.input_tokens * 5 + usage.output_tokens * 40
    assert await balance(stack.service, who.account) == 5_000_000 - cost


# --- the Node SDK ------------------------------------------------------------------------------


async def test_node_sdk_streams_edits(node: str, stack: Stack) -> None:  # noqa: F811
    tenant = await make_tenant(stack.service)
    image = base64.b64encode(SOURCE).decode()
    body = {"model": "local", "prompt": PROMPT, "size": "256x256", "stream": True}
    jobs = []
    for base_url in stack.fronts.values():
        jobs += [
            {
                "base_url": base_url,
                "key": tenant.key,
                "op": "edit",
                "images": [image],
                "body": {**body, "partial_images": 1},
            },
            {
                "base_url": base_url,
                "key": tenant.key,
                "op": "edit",
                "images": [image, image],
                "body": {**body, "n": 2},
            },
        ]
    results = await run_node(node, jobs)
    for previews, several in zip(*[iter(results)] * 2, strict=True):
        assert previews["error"] is None, previews["error"]
        assert [(e["type"], e["partial_image_index"]) for e in previews["events"]] == [
            ("image_edit.partial_image", 0),
            ("image_edit.completed", None),
        ]
        assert all(e["png"] and e["size"] == "256x256" for e in previews["events"])
        assert several["error"] is None, several["error"]
        assert [e["type"] for e in several["events"]] == ["image_edit.completed"] * 2
    assert await balance(stack.service, tenant.account) == CREDIT - len(stack.fronts) * 3 * 1000


def test_json_rule() -> None:
    assert stream_requested("application/json", json.dumps({"stream": True}).encode())
    assert not stream_requested("application/json", b'{"stream": "true"}')
    assert not stream_requested("application/json", b'{"stream": true, "x": NaN}')
    assert not stream_requested("Application/JSON", b"[true]")
