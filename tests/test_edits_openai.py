"""Edits and variations against the fake OpenAI and Azure servers: the official SDK through
both fronts and a gRPC client, the multipart on the upstream's wire exactly as OpenAI
expects it (image[] for gpt-image, one image for dall-e-2, mask, fields per family), and
the money: dall-e-2 per image, gpt-image from the reported usage, input-image tokens too.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import grpc
import pytest
from google.api import httpbody_pb2
from imagegate.v1 import images_pb2, images_pb2_grpc

from service.server import message_size_options
from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk
from tests.fakes.base import Fault
from tests.fakes.openai import FakeOpenAI
from tests.fakes.openai_edits import IMAGE_TOKENS
from tests.providers_harness import FAKE_ENV, FAST_DISPATCH, model, provider, provider_stack, route
from tests.rest import assert_error, call
from tests.upload_helpers import data_url, encode, mask, multipart, picture, png

OPENAI_KEY = FAKE_ENV["OPENAI_API_KEY"]
AZURE_KEY = FAKE_ENV["AZURE_OPENAI_API_KEY"]
ENV = {"OPENAI_API_KEY": OPENAI_KEY, "AZURE_OPENAI_API_KEY": AZURE_KEY}
CREDIT = 5_000_000
PROMPT = "add a red kite in the sky"
SQUARE = png((64, 64), (10, 120, 200))
WIDE = encode(picture((96, 64), (200, 120, 10)), "JPEG")
HOLE = mask((64, 64), (0, 0, 31, 63))
DALL_E_2 = 20_000  # shipped price, 1024x1024
# The fake's gpt-image-1 usage at "low" (shipped token prices, USD per 1M tokens).
TEXT_IN, IMAGE_IN, OUTPUT = 5, 10, 40
LOW_OUTPUT_TOKENS = 272
GPT_IMAGE = {
    "family": "gpt-image",
    "sizes": ["1024x1024"],
    "qualities": ["low", "medium", "high"],
    "default_quality": "low",
    "output_formats": ["png", "jpeg", "webp"],
    "edits": True,
    "input_fidelities": ["high", "low"],
    "token_prices": {"text_input": 5_000_000, "image_input": 10_000_000, "output": 40_000_000},
    "prices": {"low": {"1024x1024": 11000}},
}


def edit_cost(pictures: int, n: int = 1, prompt: str = PROMPT) -> int:
    """What the fake's usage for a gpt-image edit comes to (one call)."""
    return (
        (len(prompt) // 4) * TEXT_IN
        + IMAGE_TOKENS * pictures * IMAGE_IN
        + LOW_OUTPUT_TOKENS * n * OUTPUT
    )


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(
        openai_key=OPENAI_KEY,
        azure_key=AZURE_KEY,
        deployments={"gpt-image-1": "gpt-image-1", "house": "gpt-image-1"},
    )
    server.retry_after = 0
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def ostack(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI
) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("openai-edits"),
        providers={
            "openai": provider("openai", fake.openai_base),
            "azure": provider("azure_openai", fake.base_url),
            "azure-v1": provider("azure_openai", fake.base_url, api_version="v1"),
        },
        models={
            "azure-gpt": model(route("azure", "gpt-image-1"), **GPT_IMAGE),
            "v1-gpt": model(route("azure-v1", "house"), **GPT_IMAGE),
        },
        env=ENV,
        dispatch=FAST_DISPATCH | {"breaker_failures": 1000},
    ) as stack:
        yield stack


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest, ostack: Stack) -> str:
    return ostack.fronts[request.param]


@pytest.fixture
async def who(ostack: Stack, fake: FakeOpenAI) -> Tenant:
    fake.faults.clear()
    return await make_tenant(ostack.service, credit_usd="5")


async def test_gpt_image_edit_several_images_and_mask(
    ostack: Stack, fake: FakeOpenAI, front: str, who: Tenant
) -> None:
    client = sdk(front, who.key)
    raw = await client.images.with_raw_response.edit(
        model="gpt-image-1",
        image=[("a.png", SQUARE, "image/png"), ("b.jpg", WIDE, "image/jpeg")],
        mask=("mask.png", HOLE, "image/png"),
        prompt=PROMPT,
        n=2,
        quality="low",
        input_fidelity="high",
        output_format="webp",
    )
    result = raw.parse()
    assert len(result.data) == 2 and all(d.url for d in result.data)
    sent = fake.uploads[-1]
    assert sent.path == "/v1/images/edits"
    assert sent.fields == {
        "model": "gpt-image-1",
        "prompt": PROMPT,
        "n": "2",
        "size": "1024x1024",
        "quality": "low",
        "output_format": "webp",
        "input_fidelity": "high",
    }
    assert [(f.name, f.content_type, f.data) for f in sent.files] == [
        ("image[]", "image/png", SQUARE),
        ("image[]", "image/jpeg", WIDE),
        ("mask", "image/png", HOLE),
    ]
    assert [f.filename for f in sent.files] == ["image_0.png", "image_1.jpg", "mask.png"]
    request = fake.requests[-1]
    assert request.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert request.headers["X-Client-Request-Id"] == raw.headers["x-request-id"]
    # Input images are charged from the reported usage, at the image-input price.
    assert result.usage is not None
    assert result.usage.input_tokens_details.image_tokens == 3 * IMAGE_TOKENS
    assert await balance(ostack.service, who.account) == CREDIT - edit_cost(3, n=2)


async def test_gpt_image_one_image_is_sent_as_image_brackets(
    ostack: Stack, fake: FakeOpenAI, front: str, who: Tenant
) -> None:
    client = sdk(front, who.key)
    result = await client.images.edit(
        model="gpt-image-1",
        image=("a.png", SQUARE, "image/png"),
        prompt=PROMPT,
        quality="low",
        response_format="b64_json",  # ours to honour; never forwarded to gpt-image
    )
    assert base64.b64decode(result.data[0].b64_json or "")[:4] == b"\x89PNG"
    sent = fake.uploads[-1]
    assert [f.name for f in sent.files] == ["image[]"]
    assert "response_format" not in sent.fields
    assert await balance(ostack.service, who.account) == CREDIT - edit_cost(1)


async def test_dall_e_2_edit_and_variation(
    ostack: Stack, fake: FakeOpenAI, front: str, who: Tenant
) -> None:
    client = sdk(front, who.key)
    result = await client.images.edit(
        model="dall-e-2",
        image=("a.png", SQUARE, "image/png"),
        mask=("mask.png", HOLE, "image/png"),
        prompt=PROMPT,
        n=2,
        size="1024x1024",
        response_format="b64_json",
    )
    assert len(result.data) == 2
    sent = fake.uploads[-1]
    assert sent.fields == {
        "model": "dall-e-2",
        "prompt": PROMPT,
        "n": "2",
        "size": "1024x1024",
        "response_format": "b64_json",
    }
    assert [(f.name, f.data) for f in sent.files] == [("image", SQUARE), ("mask", HOLE)]
    with pytest.warns(DeprecationWarning):  # the SDK deprecates variations (dall-e-2's)
        varied = await client.images.create_variation(
            model="dall-e-2", image=("a.png", SQUARE, "image/png"), n=3, size="1024x1024"
        )
    assert len(varied.data) == 3 and all(d.url for d in varied.data)
    sent = fake.uploads[-1]
    assert sent.path == "/v1/images/variations"
    assert sent.fields == {
        "model": "dall-e-2",
        "n": "3",
        "size": "1024x1024",
        "response_format": "b64_json",  # the URL the caller wants is ours
    }
    assert [(f.name, f.data) for f in sent.files] == [("image", SQUARE)]
    assert await balance(ostack.service, who.account) == CREDIT - 5 * DALL_E_2


async def test_model_rules_refuse_before_the_upstream(
    ostack: Stack, fake: FakeOpenAI, front: str, who: Tenant
) -> None:
    before = len(fake.uploads)
    ctype, body = multipart(
        [("model", "dall-e-2"), ("prompt", PROMPT), ("image", ("w.jpg", WIDE, "image/jpeg"))]
    )
    reply = await call(
        "POST", front + "/v1/images/edits", key=who.key, body=body, headers={"Content-Type": ctype}
    )
    error = assert_error(reply, 400, "invalid_request_error", "invalid_value", "image")
    assert "takes PNG images" in error["message"]
    ctype, body = multipart([("model", "gpt-image-1"), ("image", ("a.png", SQUARE, "image/png"))])
    reply = await call(
        "POST",
        front + "/v1/images/variations",
        key=who.key,
        body=body,
        headers={"Content-Type": ctype},
    )
    error = assert_error(reply, 400, "invalid_request_error", "invalid_value", "model")
    assert error["message"] == "Model 'gpt-image-1' does not support image variations."
    assert len(fake.uploads) == before
    assert await balance(ostack.service, who.account) == CREDIT


@pytest.mark.parametrize(
    ("model_id", "path", "field"),
    [
        ("azure-gpt", "/openai/deployments/gpt-image-1/images/edits", None),
        ("v1-gpt", "/openai/v1/images/edits", "house"),
    ],
)
async def test_azure_edits(
    ostack: Stack,
    fake: FakeOpenAI,
    front: str,
    who: Tenant,
    model_id: str,
    path: str,
    field: str | None,
) -> None:
    client = sdk(front, who.key)
    await client.images.edit(
        model=model_id, image=("a.png", SQUARE, "image/png"), prompt=PROMPT, quality="low"
    )
    sent = fake.uploads[-1]
    assert sent.path == path
    assert sent.fields.get("model") == field
    assert fake.requests[-1].headers["api-key"] == AZURE_KEY
    assert await balance(ostack.service, who.account) == CREDIT - edit_cost(1)


async def test_json_image_url_form_reaches_openai_as_multipart(
    ostack: Stack, fake: FakeOpenAI, front: str, who: Tenant
) -> None:
    reply = await call(
        "POST",
        front + "/v1/images/edits",
        key=who.key,
        json_body={
            "model": "gpt-image-1",
            "prompt": PROMPT,
            "quality": "low",
            "images": [{"image_url": data_url(SQUARE)}],
            "mask": {"image_url": data_url(HOLE)},
        },
    )
    assert reply.status == 200, reply.body
    sent = fake.uploads[-1]
    assert [(f.name, f.data) for f in sent.files] == [("image[]", SQUARE), ("mask", HOLE)]
    assert await balance(ostack.service, who.account) == CREDIT - edit_cost(2)


async def test_grpc_edit_against_openai(ostack: Stack, fake: FakeOpenAI) -> None:
    who = await make_tenant(ostack.service, credit_usd="5")
    ctype, body = multipart(
        [
            ("model", "gpt-image-1"),
            ("prompt", PROMPT),
            ("quality", "low"),
            ("response_format", "b64_json"),
            ("image[]", ("a.png", SQUARE, "image/png")),
            ("image[]", ("b.png", SQUARE, "image/png")),
        ]
    )
    async with grpc.aio.insecure_channel(
        ostack.grpc_target, options=message_size_options(64 * 1024 * 1024)
    ) as channel:
        reply = await images_pb2_grpc.ImageServiceStub(channel).EditImages(
            images_pb2.EditImagesRequest(body=httpbody_pb2.HttpBody(content_type=ctype, data=body)),
            metadata=[("authorization", f"Bearer {who.key}")],
        )
    assert reply.data[0].b64_json[:4] == b"\x89PNG"
    assert reply.usage.input_tokens_details.image_tokens == 2 * IMAGE_TOKENS
    assert [f.data for f in fake.uploads[-1].images()] == [SQUARE, SQUARE]
    assert await balance(ostack.service, who.account) == CREDIT - edit_cost(2)


@pytest.mark.parametrize(
    ("fault", "status", "type_", "code"),
    [
        (Fault.SAFETY, 400, "invalid_request_error", "content_policy_violation"),
        (Fault.BAD_REQUEST, 400, "invalid_request_error", "invalid_value"),
        (Fault.SERVER_ERROR, 502, "upstream_error", "upstream_error"),
    ],
)
async def test_upstream_failures_cost_nothing(
    ostack: Stack,
    fake: FakeOpenAI,
    front: str,
    who: Tenant,
    fault: Fault,
    status: int,
    type_: str,
    code: str,
) -> None:
    # SERVER_ERROR: each attempt of each route (openai, then azure) fails.
    fake.inject(*[fault] * 4)
    ctype, body = multipart(
        [("model", "gpt-image-1"), ("prompt", PROMPT), ("image", ("a.png", SQUARE, "image/png"))]
    )
    reply = await call(
        "POST", front + "/v1/images/edits", key=who.key, body=body, headers={"Content-Type": ctype}
    )
    assert (reply.status, reply.json()["error"]["type"], reply.json()["error"]["code"]) == (
        status,
        type_,
        code,
    )
    assert await balance(ostack.service, who.account) == CREDIT
