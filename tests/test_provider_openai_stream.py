"""Streaming upstreams: the openai and azure_openai adapters against the fake's server-sent
events (gpt-image calls of one image), and the SSE reader itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from service.errors import UpstreamError
from service.providers import azure, openai, sse
from service.providers.base import (
    AdapterDeps,
    CompletedImage,
    PartialImage,
    ProviderSettings,
    StreamEvent,
    StreamingProvider,
)
from service.providers.download import SafeDownloader
from tests.fakes.base import Fault
from tests.fakes.openai import AZURE_KEY, OPENAI_KEY, FakeOpenAI, image_call

PROMPT_TOKENS = len("a lighthouse at dusk") // 4


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def deps() -> AsyncIterator[AdapterDeps]:
    async with aiohttp.ClientSession() as http:
        download = SafeDownloader("oai", ["127.0.0.1"], timeout_s=5)
        yield AdapterDeps(
            http, download, {"OPENAI_API_KEY": OPENAI_KEY, "AZURE_OPENAI_API_KEY": AZURE_KEY}
        )
        await download.aclose()


def openai_adapter(fake: FakeOpenAI, deps: AdapterDeps) -> StreamingProvider:
    settings = ProviderSettings(id="oai", kind="openai", base_url=fake.openai_base, timeout_s=5)
    adapter = openai.create(settings, deps)
    assert isinstance(adapter, StreamingProvider)
    return adapter


def azure_adapter(fake: FakeOpenAI, deps: AdapterDeps, **options: str) -> StreamingProvider:
    settings = ProviderSettings(
        id="az", kind="azure_openai", base_url=fake.base_url, timeout_s=5, options=options
    )
    adapter = azure.create(settings, deps)
    assert isinstance(adapter, StreamingProvider)
    return adapter


async def events(adapter: StreamingProvider, **call: object) -> list[StreamEvent]:
    return [e async for e in adapter.stream(image_call(**call))]  # type: ignore[arg-type]


def shape(items: list[StreamEvent]) -> list[str]:
    return [f"partial{e.index}" if isinstance(e, PartialImage) else "image" for e in items]


async def test_gpt_image_streams_upstream_with_its_previews(
    fake: FakeOpenAI, deps: AdapterDeps
) -> None:
    got = await events(
        openai_adapter(fake, deps), model_id="gpt-image-1", quality="low", partial_images=2
    )
    sent = fake.requests[-1].json
    assert sent["stream"] is True and sent["partial_images"] == 2
    assert "response_format" not in sent
    assert shape(got) == ["partial0", "partial1", "image"]
    assert all(
        (e.data if isinstance(e, PartialImage) else e.image.data).startswith(b"\x89PNG")
        for e in got
    )
    done = got[-1]
    assert isinstance(done, CompletedImage)
    assert (done.usage.input_text_tokens, done.usage.output_tokens) == (PROMPT_TOKENS, 272)


async def test_several_images_and_dall_e_are_plain_calls_as_events(
    fake: FakeOpenAI, deps: AdapterDeps
) -> None:
    adapter = openai_adapter(fake, deps)
    got = await events(adapter, model_id="gpt-image-1", n=2, quality="low", partial_images=2)
    assert "stream" not in fake.requests[-1].json
    assert shape(got) == ["image", "image"]
    usages = [e.usage.output_tokens for e in got if isinstance(e, CompletedImage)]
    assert usages == [2 * 272, 0]  # the call's usage rides on its first image
    got = await events(adapter, model_id="dall-e-3", quality="standard")
    assert "stream" not in fake.requests[-1].json and shape(got) == ["image"]


async def test_azure_deployment_streams_the_same_way(fake: FakeOpenAI, deps: AdapterDeps) -> None:
    got = await events(
        azure_adapter(fake, deps), model_id="gpt-image-1", upstream_model="gpt-image-deploy",
        quality="low", partial_images=1,
    )  # fmt: skip
    seen = fake.requests[-1]
    assert seen.path == "/openai/deployments/gpt-image-deploy/images/generations"
    assert seen.headers["api-key"] == AZURE_KEY and seen.json["stream"] is True
    assert shape(got) == ["partial0", "image"]
    got = await events(
        azure_adapter(fake, deps, api_version="v1"), model_id="gpt-image-1",
        upstream_model="gpt-image-deploy", quality="low", partial_images=0,
    )  # fmt: skip
    assert fake.requests[-1].path == "/openai/v1/images/generations"
    assert shape(got) == ["image"]


async def test_error_event_after_previews_is_an_upstream_error(
    fake: FakeOpenAI, deps: AdapterDeps, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.stream_end = "error"
    got: list[StreamEvent] = []
    with pytest.raises(UpstreamError) as raised:
        async for event in openai_adapter(fake, deps).stream(
            image_call("gpt-image-1", quality="low", partial_images=2)
        ):
            got.append(event)
    assert shape(got) == ["partial0", "partial1"]
    assert "server had an error" in raised.value.message
    assert OPENAI_KEY not in raised.value.message
    assert all(OPENAI_KEY not in r.getMessage() for r in caplog.records)


async def test_stream_dropped_after_previews_is_a_transport_error(
    fake: FakeOpenAI, deps: AdapterDeps
) -> None:
    fake.stream_end = "cut"
    got: list[StreamEvent] = []
    with pytest.raises(UpstreamError) as raised:
        async for event in openai_adapter(fake, deps).stream(
            image_call("gpt-image-1", quality="low", partial_images=1)
        ):
            got.append(event)
    assert shape(got) == ["partial0"] and raised.value.retryable


async def test_refusal_before_the_stream_is_the_usual_error(
    fake: FakeOpenAI, deps: AdapterDeps
) -> None:
    fake.inject(Fault.RATE_LIMITED)
    with pytest.raises(UpstreamError) as raised:
        await events(openai_adapter(fake, deps), model_id="gpt-image-1", quality="low")
    assert raised.value.retryable and raised.value.retry_after_s == 7


async def sse_server(chunks: list[bytes]) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
            await asyncio.sleep(0)
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/"


async def read_all(chunks: list[bytes], limit: int = 1 << 30) -> list[sse.Event]:
    runner, url = await sse_server(chunks)
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            blocks = [b async for b in sse.read_blocks(response, "p", limit)]
            return [e for e in map(sse.parse, blocks) if e is not None]
    finally:
        await runner.cleanup()


async def test_sse_reader_takes_megabyte_lines_crlf_comments_and_split_boundaries() -> None:
    big = "x" * (3 * 1024 * 1024)  # far over aiohttp's readline limit
    body = (
        b": a comment\r\n\r\n"
        + b"event: one\r\ndata: " + big.encode() + b"\r\n\r\n"
        + b"data: {\"a\":\"\xe2\x80\xa8\"}\n"  # U+2028 inside JSON is not a line end
        + b"data: second line\n\n"
        + b"event: last\ndata: end"
    )  # fmt: skip
    # Cut after every line-end byte (so between the two of each boundary too), and
    # every 64 KiB inside the big line.
    cuts = {i + 1 for i, byte in enumerate(body) if byte in b"\r\n"}
    cuts = sorted(cuts | set(range(0, len(body), 65536)) | {len(body)})
    chunks = [body[a:b] for a, b in zip([0, *cuts], cuts, strict=False) if b > a]
    got = await read_all(chunks)
    assert (got[0].event, len(got[0].data)) == ("one", len(big))
    assert got[1] == sse.Event(None, '{"a":"\u2028"}\nsecond line')
    assert got[2] == sse.Event("last", "end")


async def test_sse_reader_refuses_a_stream_over_its_limit() -> None:
    with pytest.raises(UpstreamError, match="over 1000 bytes"):
        await read_all([b"data: " + b"x" * 2000 + b"\n\n"], limit=1000)
