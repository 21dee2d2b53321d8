"""Google (Gemini API, Vertex AI) and Bedrock end to end: the official SDK through both fronts,
the real service and registry, fake upstreams speaking each wire format; every fault's status
and body, the balance after each, and no upstream credential in any log record or response.

The shipped catalog's own models are used where they exist (`imagen-3`, `nova-canvas`,
`bedrock-stable-image-core`): the test catalog only points their providers at the fakes.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai
import pytest

from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk
from tests.fakes.base import FakeUpstream, Fault, image_bytes
from tests.fakes.bedrock import BedrockFake
from tests.fakes.google import OUTPUT_REFUSAL, GoogleFake
from tests.providers_harness import FAST_DISPATCH, model, provider, provider_stack, route
from tests.rest import call

GEMINI_KEY = "AIzaE2E-gemini-key-0123456789abcdef"
VERTEX_TOKEN = "ya29.e2e-vertex-token-0123456789abcdef"
ACCESS_KEY = "AKIAE2EIMAGEGATE0001"
SECRET_KEY = "e2eSecret/imagegate+Key0123456789abcdefgh"
SESSION_TOKEN = "E2ESessionToken//imagegate+0123456789=="
ENV = {
    "GEMINI_API_KEY": GEMINI_KEY,
    "VERTEX_ACCESS_TOKEN": VERTEX_TOKEN,
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    "AWS_REGION": "us-east-1",
}
SECRETS = (GEMINI_KEY, VERTEX_TOKEN, SECRET_KEY, SESSION_TOKEN)
PROJECT = "proj-e2e"
IMAGEN = "imagen-3.0-generate-002"
GEMINI_PATH = f"/v1beta/models/{IMAGEN}:predict"
VERTEX_PATH = (
    f"/v1/projects/{PROJECT}/locations/us-central1/publishers/google/models/{IMAGEN}:predict"
)
CREDIT = 1_000_000
# Short enough that a stalled upstream costs the test suite little.
TIMEOUT_S = 0.6


@dataclass
class Upstreams:
    google: GoogleFake
    east: BedrockFake
    west: BedrockFake

    def all(self) -> tuple[FakeUpstream, ...]:
        return (self.google, self.east, self.west)


# Model id -> (which fake serves it, micro-USD per image at 1024x1024).
MODELS = {
    "gemini-imagen": ("google", 1000),
    "vertex-imagen": ("google", 1000),
    "nova-canvas": ("east", 40_000),
    "bedrock-stable-image-core": ("west", 40_000),
}


@pytest.fixture(scope="module")
async def upstreams() -> AsyncIterator[Upstreams]:
    fakes = Upstreams(
        GoogleFake(GEMINI_KEY, VERTEX_TOKEN, project=PROJECT),
        BedrockFake(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, region="us-east-1"),
        BedrockFake(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, region="us-west-2"),
    )
    fakes.google.retry_delay_s = 0.01
    for fake in fakes.all():
        fake.stall_s = 3 * TIMEOUT_S
        await fake.start()
    fakes.east.retry_after = fakes.west.retry_after = "0.01"
    yield fakes
    for fake in fakes.all():
        await fake.stop()


@pytest.fixture(scope="module")
async def gstack(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    imagen = {"family": "imagen", "output_formats": ["png", "jpeg"]}
    async with provider_stack(
        tmp_path_factory.mktemp("google-bedrock"),
        # The shipped providers' ids, pointed at the fakes: the shipped models route here.
        providers={
            "google": provider("google", upstreams.google.base_url, timeout_s=TIMEOUT_S),
            "vertex": provider(
                "vertex",
                upstreams.google.base_url,
                timeout_s=TIMEOUT_S,
                project=PROJECT,
                location="us-central1",
            ),
            "bedrock": provider(
                "bedrock", upstreams.east.base_url, timeout_s=TIMEOUT_S, region="us-east-1"
            ),
            "bedrock-us-west-2": provider(
                "bedrock", upstreams.west.base_url, timeout_s=TIMEOUT_S, region="us-west-2"
            ),
        },
        models={
            "gemini-imagen": model(route("google", IMAGEN), **imagen),
            "vertex-imagen": model(route("vertex", IMAGEN), **imagen),
        },
        env=ENV,
        # The breaker is dispatch's own test; here every fault must reach the fake.
        dispatch={**FAST_DISPATCH, "breaker_failures": 1000},
    ) as stack:
        yield stack


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest, gstack: Stack) -> str:
    return gstack.fronts[str(request.param)]


@pytest.fixture
async def who(gstack: Stack, upstreams: Upstreams) -> AsyncIterator[Tenant]:
    yield await make_tenant(gstack.service)
    for fake in upstreams.all():
        # Every injected fault was played: none leaks into the next test.
        assert not fake.faults
        fake.filter_next = 0


def fake_for(upstreams: Upstreams, model_id: str) -> FakeUpstream:
    fake: FakeUpstream = getattr(upstreams, MODELS[model_id][0])
    return fake


def expected_images(model_id: str, n: int) -> list[bytes]:
    # Stability on Bedrock makes one image per call, so each of the n calls sends seed 0.
    if model_id == "bedrock-stable-image-core":
        return [image_bytes(seed=0)] * n
    return [image_bytes(seed=i) for i in range(n)]


@pytest.mark.parametrize("model_id", list(MODELS))
async def test_success_b64_json_and_url(
    gstack: Stack, front: str, who: Tenant, model_id: str
) -> None:
    client = sdk(front, who.key)
    result = await client.images.generate(
        model=model_id, prompt="a lighthouse at dusk", n=2, response_format="b64_json"
    )
    assert [base64.b64decode(d.b64_json or "") for d in result.data] == expected_images(model_id, 2)
    linked = await client.images.generate(model=model_id, prompt="a lighthouse at dusk")
    assert linked.data[0].url and linked.data[0].b64_json is None
    image = await call("GET", linked.data[0].url)
    assert (image.status, image.body) == (200, image_bytes(seed=0))
    assert image.headers["Content-Type"] == "image/png"
    price = MODELS[model_id][1]
    assert await balance(gstack.service, who.account) == CREDIT - 3 * price


async def test_imagen_3_end_to_end_on_the_gemini_api(
    gstack: Stack, front: str, who: Tenant, upstreams: Upstreams
) -> None:
    fake = upstreams.google
    start = len(fake.requests)
    client = sdk(front, who.key)
    result = await client.images.generate(
        model="imagen-3",
        prompt="A cute baby sea otter",
        n=2,
        size="1792x1024",
        response_format="b64_json",
    )
    assert [base64.b64decode(d.b64_json or "") for d in result.data] == [
        image_bytes(seed=0),
        image_bytes(seed=1),
    ]
    linked = await client.images.generate(model="imagen-3", prompt="A cute baby sea otter")
    assert (await call("GET", linked.data[0].url or "")).body == image_bytes(seed=0)
    sent = fake.requests[start:]
    assert [seen.path for seen in sent] == [GEMINI_PATH, GEMINI_PATH]
    assert sent[0].headers["x-goog-api-key"] == GEMINI_KEY
    assert sent[0].json["parameters"] == {
        "sampleCount": 2,
        "aspectRatio": "16:9",
        "includeRaiReason": True,
    }
    # Imagen 3 lists at USD 0.04 an image in the shipped catalog.
    assert await balance(gstack.service, who.account) == CREDIT - 3 * 40_000
    row = (await gstack.service.store.usage(who.account, 1))[0]
    assert (row.provider, row.upstream_model, row.status) == ("google", IMAGEN, "settled")


async def test_imagen_3_splits_n_into_calls_of_four(
    gstack: Stack, front: str, who: Tenant, upstreams: Upstreams
) -> None:
    start = len(upstreams.google.requests)
    result = await sdk(front, who.key).images.generate(
        model="imagen-3", prompt="p", n=6, response_format="b64_json"
    )
    assert len(result.data) == 6
    counts = sorted(s.json["parameters"]["sampleCount"] for s in upstreams.google.requests[start:])
    assert counts == [2, 4]
    assert await balance(gstack.service, who.account) == CREDIT - 6 * 40_000


async def test_imagen_3_fails_over_from_the_gemini_api_to_vertex(
    gstack: Stack, front: str, who: Tenant, upstreams: Upstreams
) -> None:
    fake = upstreams.google
    start = len(fake.requests)
    fake.inject(Fault.SERVER_ERROR, Fault.SERVER_ERROR)
    result = await sdk(front, who.key).images.generate(
        model="imagen-3", prompt="p", response_format="b64_json"
    )
    assert base64.b64decode(result.data[0].b64_json or "") == image_bytes(seed=0)
    assert [seen.path for seen in fake.requests[start:]] == [GEMINI_PATH, GEMINI_PATH, VERTEX_PATH]
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {VERTEX_TOKEN}"
    assert await balance(gstack.service, who.account) == CREDIT - 40_000
    row = (await gstack.service.store.usage(who.account, 1))[0]
    assert (row.provider, row.cost_micros) == ("vertex", 40_000)


async def test_imagen_3_safety_refusal_does_not_fail_over(
    gstack: Stack, front: str, who: Tenant, upstreams: Upstreams
) -> None:
    fake = upstreams.google
    start = len(fake.requests)
    fake.inject(Fault.SAFETY)
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(front, who.key).images.generate(model="imagen-3", prompt="p")
    error = raised.value.response.json()["error"]
    assert (error["code"], error["message"]) == ("content_policy_violation", OUTPUT_REFUSAL)
    assert [seen.path for seen in fake.requests[start:]] == [GEMINI_PATH]
    assert await balance(gstack.service, who.account) == CREDIT


@pytest.mark.parametrize("model_id", ["gemini-imagen", "vertex-imagen", "nova-canvas"])
async def test_some_images_filtered_charges_the_delivered_ones(
    gstack: Stack, front: str, who: Tenant, upstreams: Upstreams, model_id: str
) -> None:
    fake = fake_for(upstreams, model_id)
    assert isinstance(fake, GoogleFake | BedrockFake)
    fake.filter_next = 1
    result = await sdk(front, who.key).images.generate(
        model=model_id, prompt="p", n=3, response_format="b64_json"
    )
    assert len(result.data) == 2
    assert await balance(gstack.service, who.account) == CREDIT - 2 * MODELS[model_id][1]


@pytest.mark.parametrize("model_id", list(MODELS))
async def test_more_images_than_asked_are_delivered_and_charged_as_asked(
    gstack: Stack, front: str, who: Tenant, upstreams: Upstreams, model_id: str
) -> None:
    fake_for(upstreams, model_id).inject(Fault.EXTRA_IMAGES)
    result = await sdk(front, who.key).images.generate(
        model=model_id, prompt="p", n=1, response_format="b64_json"
    )
    assert len(result.data) == 1
    assert await balance(gstack.service, who.account) == CREDIT - MODELS[model_id][1]


async def test_a_transient_failure_is_retried_and_charged_once(
    gstack: Stack, front: str, who: Tenant, upstreams: Upstreams
) -> None:
    upstreams.east.inject(Fault.RATE_LIMITED)
    result = await sdk(front, who.key).images.generate(
        model="nova-canvas", prompt="p", response_format="b64_json"
    )
    assert len(result.data) == 1
    assert await balance(gstack.service, who.account) == CREDIT - 40_000


# fault, how many times it is injected (the route makes two attempts), HTTP status,
# error type, code, param, and a pattern the message must contain (a stall is cut by
# the adapter's or the dispatcher's clock, whichever fires first).
FAULTS = [
    (Fault.SERVER_ERROR, 2, 502, "upstream_error", "upstream_error", None, "HTTP 500"),
    (Fault.RATE_LIMITED, 2, 502, "upstream_error", "upstream_error", None, "HTTP 429"),
    (Fault.STALL, 2, 502, "upstream_error", "upstream_error", None, "timed out|did not answer"),
    (Fault.RESET, 2, 502, "upstream_error", "upstream_error", None, "could not be reached"),
    (Fault.MALFORMED, 1, 502, "upstream_error", "upstream_error", None, "not JSON"),
    (Fault.AUTH, 1, 502, "upstream_error", "upstream_error", None, "refused the gateway's"),
    (Fault.SAFETY, 1, 400, "invalid_request_error", "content_policy_violation", None, ""),
    (Fault.BAD_REQUEST, 1, 400, "invalid_request_error", "invalid_value", "prompt", "rejected"),
]


@pytest.mark.parametrize("model_id", list(MODELS))
@pytest.mark.parametrize(
    ("fault", "times", "status", "type_", "code", "param", "words"),
    FAULTS,
    ids=[f[0].name for f in FAULTS],
)
async def test_fault(
    gstack: Stack,
    front: str,
    who: Tenant,
    upstreams: Upstreams,
    caplog: pytest.LogCaptureFixture,
    model_id: str,
    fault: Fault,
    times: int,
    status: int,
    type_: str,
    code: str,
    param: str | None,
    words: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_for(upstreams, model_id).inject(*[fault] * times)
    with pytest.raises(openai.APIStatusError) as raised:
        await sdk(front, who.key).images.generate(model=model_id, prompt="a lighthouse")
    response = raised.value.response
    assert response.status_code == status
    body = response.json()
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "param", "code"]
    error = body["error"]
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)
    assert re.search(words, error["message"]), error["message"]
    if status == 502:
        assert f"'{provider_of(model_id)}'" in error["message"]
    assert await balance(gstack.service, who.account) == CREDIT
    for secret in SECRETS:
        assert secret not in response.text
        assert secret not in caplog.text
        assert not any(secret in str(r.args) for r in caplog.records)
    assert caplog.records  # the capture did see the service's log lines


def provider_of(model_id: str) -> str:
    return {
        "gemini-imagen": "google",
        "vertex-imagen": "vertex",
        "nova-canvas": "bedrock",
        "bedrock-stable-image-core": "bedrock-us-west-2",
    }[model_id]
