"""Streaming from upstreams that stream (OpenAI and Azure gpt-image), end to end: the
official SDK through both fronts, previews passed on while the upstream still works,
the completed image charged from the usage it reports, an upstream error event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import openai
import pytest

from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, strict_sdk
from tests.fakes.openai import FakeOpenAI
from tests.providers_harness import FAKE_ENV, FAST_DISPATCH, model, provider, provider_stack, route
from tests.test_providers_openai_e2e import GPT_IMAGE, PROMPT, gpt_image_cost

CREDIT = 1_000_000
ENV = {k: FAKE_ENV[k] for k in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY")}


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(
        openai_key=ENV["OPENAI_API_KEY"],
        azure_key=ENV["AZURE_OPENAI_API_KEY"],
        deployments={"house": "gpt-image-1"},
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def ostack(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI
) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("openai-stream"),
        providers={
            "openai": provider("openai", fake.openai_base),
            "azure": provider("azure_openai", fake.base_url),
        },
        models={
            "solo-gpt": model(route("openai", "gpt-image-1"), **GPT_IMAGE),
            "azure-gpt": model(route("azure", "house"), **GPT_IMAGE),
        },
        env=ENV,
        dispatch=FAST_DISPATCH | {"breaker_failures": 1000},
    ) as stack:
        yield stack


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest, ostack: Stack) -> str:
    return ostack.fronts[request.param]


@pytest.fixture
async def who(ostack: Stack, fake: FakeOpenAI) -> AsyncIterator[Tenant]:
    fake.stream_end, fake.stream_gate = None, None
    yield await make_tenant(ostack.service)
    fake.stream_end, fake.stream_gate = None, None


@pytest.mark.parametrize("model_id", ["solo-gpt", "azure-gpt"])
async def test_previews_pass_through_while_the_upstream_still_works(
    ostack: Stack, fake: FakeOpenAI, front: str, who: Tenant, model_id: str
) -> None:
    # The upstream holds its completed event until the caller has both previews: were
    # they buffered anywhere (adapter, service, front), this would never finish.
    fake.stream_gate = asyncio.Event()
    client = strict_sdk(front, who.key)
    async with asyncio.timeout(20):
        stream = await client.images.generate(
            model=model_id, prompt=PROMPT, quality="low", stream=True, partial_images=2
        )
        events = []
        async for event in stream:
            events.append(event)
            if len(events) == 2:
                fake.stream_gate.set()
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert fake.requests[-1].json["stream"] is True
    done = events[2]
    assert done.type == "image_generation.completed"
    assert (done.quality, done.output_format, done.size) == ("low", "png", "1024x1024")
    assert done.usage.output_tokens == 272 and done.usage.input_tokens == len(PROMPT) // 4
    # Charged from the usage the upstream reported with the completed image.
    assert await balance(ostack.service, who.account) == CREDIT - gpt_image_cost(1)


async def test_upstream_error_event_after_previews_reaches_the_sdk(
    ostack: Stack, fake: FakeOpenAI, front: str, who: Tenant
) -> None:
    fake.stream_end = "error"
    client = strict_sdk(front, who.key)
    stream = await client.images.generate(
        model="solo-gpt", prompt=PROMPT, quality="low", stream=True, partial_images=1
    )
    seen = []
    with pytest.raises(openai.APIError) as raised:
        async for event in stream:
            seen.append(event.type)
    assert seen == ["image_generation.partial_image"]
    assert "'openai'" in raised.value.message
    assert await balance(ostack.service, who.account) == CREDIT
