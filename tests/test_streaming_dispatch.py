"""Streamed dispatch: events pass on as they come; a call is retried or failed over only
until it has passed an event on; adapters without `stream` are wrapped."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from service.catalog import Catalog, Route
from service.errors import UpstreamError
from service.providers.base import CompletedImage, PartialImage, TokenUsage
from service.providers.dispatch import Dispatcher, Streamed
from service.requests import GenerationParams, ImageRequest, validate
from tests.fakes.scripted import ScriptedProvider, Step, fail
from tests.fakes.streaming import Scene, StreamingProvider
from tests.test_dispatch import SETTINGS, Time, spec

A = Route("a", "model-a")
B = Route("b", "model-b")


def streamed_request(*routes: Route, n: int = 1, partial_images: int = 2) -> ImageRequest:
    params = GenerationParams(prompt="p", n=n, stream=True, partial_images=partial_images)
    return validate(params, Catalog({"m": spec(*routes)}), "m", streaming=True)


def dispatcher(**providers: ScriptedProvider) -> Dispatcher:
    t = Time()
    return Dispatcher(
        providers, SETTINGS, upstream_timeout_s=60, clock=t, sleep=t.sleep, random_=lambda: 0.5
    )


async def collect(d: Dispatcher, request: ImageRequest) -> list[Streamed]:
    return [item async for item in d.stream(request)]


def kinds(items: list[Streamed]) -> list[str]:
    return [
        f"partial{i.event.index}" if isinstance(i.event, PartialImage) else "image" for i in items
    ]


async def test_previews_then_the_image_from_a_streaming_adapter() -> None:
    a = StreamingProvider("a")
    items = await collect(dispatcher(a=a), streamed_request(A, partial_images=2))
    assert kinds(items) == ["partial0", "partial1", "image"]
    assert {i.route for i in items} == {A}


async def test_an_adapter_without_stream_is_wrapped_and_its_usage_rides_the_first_image() -> None:
    a = ScriptedProvider("a")
    a.default = Step(usage=TokenUsage(10, 0, 20))
    items = await collect(dispatcher(a=a), streamed_request(A, n=3, partial_images=0))
    assert kinds(items) == ["image"] * 3
    usages = [i.event.usage for i in items if isinstance(i.event, CompletedImage)]
    assert usages == [TokenUsage(10, 0, 20), TokenUsage(), TokenUsage()]


async def test_no_previews_for_several_images_even_if_the_adapter_sends_them() -> None:
    a = StreamingProvider("a").play(Scene(partials=3))
    request = streamed_request(A, n=2, partial_images=3)
    assert request.partial_images == 0
    assert kinds(await collect(dispatcher(a=a), request)) == ["image", "image"]


async def test_a_call_that_fails_before_any_event_is_retried_then_failed_over() -> None:
    a = StreamingProvider("a").play(
        Scene(partials=0, images=0, error=fail().error),
        Scene(partials=0, images=0, error=fail().error),
        Scene(partials=0, images=0, error=fail().error),
    )
    b = StreamingProvider("b")
    items = await collect(dispatcher(a=a, b=b), streamed_request(A, B, partial_images=1))
    assert len(a.streamed) == 3 and len(b.streamed) == 1
    assert kinds(items) == ["partial0", "image"] and {i.route for i in items} == {B}


async def test_a_call_that_fails_after_a_preview_is_final() -> None:
    a = StreamingProvider("a").play(Scene(partials=1, images=0, error=fail().error))
    b = StreamingProvider("b")
    seen: list[Streamed] = []
    with pytest.raises(UpstreamError, match="'a'"):
        async for item in dispatcher(a=a, b=b).stream(streamed_request(A, B)):
            seen.append(item)
    assert kinds(seen) == ["partial0"]
    assert len(a.streamed) == 1 and not b.streamed  # neither retried nor failed over


async def test_images_delivered_before_a_failure_count_as_a_partial_success() -> None:
    a = StreamingProvider("a").play(Scene(images=1, error=fail().error))
    items = await collect(dispatcher(a=a), streamed_request(A, n=3, partial_images=0))
    assert kinds(items) == ["image"]  # no error: like a unary partial success


async def test_closing_the_stream_cancels_the_upstream_calls() -> None:
    a = StreamingProvider("a", max_n=1).play(Scene(images=1), Scene(images=0, hang=True))
    stream = dispatcher(a=a).stream(streamed_request(A, n=2, partial_images=0))
    first = await anext(stream)
    assert isinstance(first.event, CompletedImage)
    await stream.aclose()
    assert a.cancelled == 1


async def test_cancelling_the_consumer_cancels_the_upstream_calls() -> None:
    a = StreamingProvider("a").play(Scene(partials=1, images=0, hang=True))
    got = asyncio.Event()

    async def consume() -> None:
        async for _ in dispatcher(a=a).stream(streamed_request(A, partial_images=1)):
            got.set()

    task = asyncio.ensure_future(consume())
    await got.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert a.cancelled == 1
