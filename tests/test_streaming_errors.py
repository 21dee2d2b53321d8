"""Streams that fail or are cut: an upstream failure before the first event, after it
(an SSE error event the SDK raises on), a client that hangs up mid-stream; each
through both fronts and gRPC, with the balance and no reservation held after."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc

from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service.errors import UpstreamError
from tests.conftest import FRONTS, Stack, Tenant, make_tenant, sdk, strict_sdk
from tests.fakes.scripted import ScriptedProvider
from tests.fakes.streaming import Scene, StreamingProvider
from tests.providers_harness import (
    FAST_DISPATCH,
    UNIT_PRICE,
    model,
    provider,
    provider_stack,
    route,
)
from tests.rest import assert_error, call
from tests.test_streaming import same_second, sse_events

REPO = Path(__file__).resolve().parents[1]
CREDIT = 1_000_000
FAKES = {"openai_compatible": "tests.fakes.streaming", "replicate": "tests.fakes.scripted"}
BODY: dict[str, Any] = {"model": "streamed", "prompt": "a lighthouse", "stream": True}
UPSTREAM_DOWN = "The upstream provider failed with HTTP 500"


@pytest.fixture(scope="module")
async def sstack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("streaming"),
        providers={
            "offline": provider("local"),
            "streamer": provider("openai_compatible"),
            "plain": provider("replicate"),
        },
        models={
            "drawn": model(route("offline", "local"), family="local"),
            "streamed": model(route("streamer", "s")),
            # One image per call: n=2 is two parallel calls.
            "streamed-single": model(route("streamer", "s1", max_n=1)),
            "plain": model(route("plain", "p")),
        },
        kind_modules=FAKES,
        # Breakers are not what this module tests: its failures must not pause routes.
        dispatch={**FAST_DISPATCH, "breaker_failures": 1000},
    ) as stack:
        yield stack


@pytest.fixture
def streamer(sstack: Stack) -> StreamingProvider:
    adapter = sstack.service.registry.providers["streamer"]
    assert isinstance(adapter, StreamingProvider)
    adapter.scenes.clear()
    adapter.default_scene = Scene()
    adapter.cancelled = 0
    return adapter


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest, sstack: Stack) -> str:
    return sstack.fronts[request.param]


@pytest.fixture
async def who(sstack: Stack) -> Tenant:
    return await make_tenant(sstack.service)


async def settled_balance(stack: Stack, tenant: Tenant) -> int:
    """The balance once no reservation of the tenant is held (the ledger agreeing).

    Polled, bounded: a client's hang-up reaches the service after the client has
    gone, so the release lands a moment later; the bound is far below any expiry."""
    store = stack.service.store
    async with asyncio.timeout(10):
        while True:
            usage = await store.usage(tenant.account, limit=100)
            if all(u.status != "held" for u in usage):
                break
            await asyncio.sleep(0.02)
    account = await store.get_account(tenant.account)
    assert account is not None
    assert await store.ledger_sum(tenant.account_id) == account.balance_micros
    return account.balance_micros


def grpc_call(
    stack: Stack, tenant: Tenant, channel: grpc.aio.Channel, **fields: Any
) -> grpc.aio.UnaryStreamCall[images_pb2.GenerateImagesRequest, images_pb2.ImageEvent]:
    stub = images_pb2_grpc.ImageServiceStub(channel)
    request = images_pb2.GenerateImagesRequest(prompt="a lighthouse", **fields)
    return stub.StreamImages(request, metadata=[("authorization", f"Bearer {tenant.key}")])


async def test_a_model_without_upstream_streaming_streams_its_completed_images(
    sstack: Stack, front: str, who: Tenant
) -> None:
    plain = sstack.service.registry.providers["plain"]
    assert isinstance(plain, ScriptedProvider) and not hasattr(plain, "stream")
    client = strict_sdk(front, who.key)
    stream = await client.images.generate(
        model="plain", prompt="a lighthouse", n=2, stream=True, partial_images=2
    )
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert await settled_balance(sstack, who) == CREDIT - 2 * UNIT_PRICE


async def test_upstream_failure_before_any_event_is_an_ordinary_502(
    sstack: Stack, front: str, who: Tenant, streamer: StreamingProvider
) -> None:
    down = Scene(partials=0, images=0, error=UpstreamError(UPSTREAM_DOWN))
    streamer.default_scene = down
    reply = await call("POST", f"{front}/v1/images/generations", key=who.key, json_body=BODY)
    error = assert_error(reply, 502, "upstream_error", "upstream_error")
    assert UPSTREAM_DOWN in error["message"]
    with pytest.raises(openai.InternalServerError) as raised:
        await sdk(front, who.key).images.generate(**BODY)
    assert raised.value.status_code == 502
    assert await settled_balance(sstack, who) == CREDIT


async def test_failure_after_a_preview_is_an_error_event_the_sdk_raises(
    sstack: Stack, front: str, who: Tenant, streamer: StreamingProvider
) -> None:
    streamer.default_scene = Scene(partials=1, images=0, error=UpstreamError(UPSTREAM_DOWN))
    client = strict_sdk(front, who.key)
    stream = await client.images.generate(**{**BODY, "partial_images": 2})
    seen = []
    with pytest.raises(openai.APIError) as raised:
        async for event in stream:
            seen.append(event.type)
    assert seen == ["image_generation.partial_image"]
    assert not isinstance(raised.value, openai.APIStatusError)  # raised from the stream itself
    assert UPSTREAM_DOWN in raised.value.message
    assert raised.value.body == {
        "message": raised.value.message,
        "type": "upstream_error",
        "param": None,
        "code": "upstream_error",
    }
    # The stream's own failure was only previews: nothing delivered, nothing charged.
    assert await settled_balance(sstack, who) == CREDIT


async def test_error_events_are_the_same_bytes_on_both_fronts_and_over_grpc(
    sstack: Stack, who: Tenant, streamer: StreamingProvider
) -> None:
    streamer.default_scene = Scene(partials=1, images=0, error=UpstreamError(UPSTREAM_DOWN))
    bodies = []
    for base_url in sstack.fronts.values():
        body = {**BODY, "partial_images": 1}
        reply = await call("POST", f"{base_url}/v1/images/generations", key=who.key, json_body=body)
        events = sse_events(reply)
        assert [e["type"] for e in events] == ["image_generation.partial_image", "error"]
        assert list(events[1]) == ["type", "error"]
        assert list(events[1]["error"]) == ["message", "type", "param", "code"]
        bodies.append(same_second(reply.body))
    assert len(set(bodies)) == 1
    async with grpc.aio.insecure_channel(sstack.grpc_target) as channel:
        stream = grpc_call(sstack, who, channel, model="streamed", partial_images=1)
        messages = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for message in stream:
                messages.append(message)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [m.type for m in messages] == ["image_generation.partial_image", "error"]
    error = messages[1].error
    assert error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert UPSTREAM_DOWN in error.message and error.message == raised.value.details()
    assert await settled_balance(sstack, who) == CREDIT


async def test_a_bug_after_the_first_event_is_the_internal_error_event(
    sstack: Stack, front: str, who: Tenant, streamer: StreamingProvider
) -> None:
    streamer.default_scene = Scene(partials=1, images=0, error=RuntimeError("adapter bug"))
    body = {**BODY, "partial_images": 1}
    reply = await call("POST", f"{front}/v1/images/generations", key=who.key, json_body=body)
    events = sse_events(reply)
    assert events[1] == {
        "type": "error",
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        },
    }
    assert await settled_balance(sstack, who) == CREDIT


async def test_partial_success_ends_normally_and_charges_the_images_delivered(
    sstack: Stack, front: str, who: Tenant, streamer: StreamingProvider
) -> None:
    # Two calls: one image, and one call that fails after nothing (retried, then given up).
    streamer.play(Scene(images=1), *[Scene(images=0, error=UpstreamError(UPSTREAM_DOWN))] * 2)
    client = strict_sdk(front, who.key)
    stream = await client.images.generate(**{**BODY, "model": "streamed-single", "n": 2})
    assert [e.type async for e in stream] == ["image_generation.completed"]
    assert await settled_balance(sstack, who) == CREDIT - UNIT_PRICE


async def read_until(response: aiohttp.ClientResponse, marker: bytes) -> bytes:
    """Read the SSE body until the whole event that starts with `marker` has arrived."""
    body = b""
    while True:
        start = body.find(marker)
        if start >= 0 and body.find(b"\n\n", start) >= 0:
            return body
        chunk = await response.content.readany()
        assert chunk, body[-300:]
        body += chunk


CUTS = [
    # (what the upstream does, the event after which the client hangs up, images charged)
    (Scene(partials=1, images=0, hang=True), b"event: image_generation.partial_image", 0),
    (Scene(partials=0, images=1), b"event: image_generation.completed", 1),
]


@pytest.mark.parametrize(("scene", "marker", "charged"), CUTS)
async def test_client_hanging_up_mid_stream_pays_for_what_was_delivered(
    sstack: Stack,
    front: str,
    who: Tenant,
    streamer: StreamingProvider,
    scene: Scene,
    marker: bytes,
    charged: int,
) -> None:
    # n=2 in two calls: the second one hangs, so the stream is cut while it waits.
    streamer.play(scene, Scene(partials=0, images=0, hang=True))
    body = {**BODY, "model": "streamed-single", "n": 2 if charged else 1, "partial_images": 1}
    headers = {"Authorization": f"Bearer {who.key}"}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{front}/v1/images/generations", json=body, headers=headers)
        assert response.status == 200
        await read_until(response, marker)
        response.close()  # hang up mid-stream
    assert await settled_balance(sstack, who) == CREDIT - charged * UNIT_PRICE
    assert streamer.cancelled == 1  # the waiting upstream call was stopped


@pytest.mark.parametrize(("scene", "marker", "charged"), CUTS)
async def test_grpc_client_cancelling_mid_stream_pays_for_what_was_delivered(
    sstack: Stack,
    who: Tenant,
    streamer: StreamingProvider,
    scene: Scene,
    marker: bytes,
    charged: int,
) -> None:
    streamer.play(scene, Scene(partials=0, images=0, hang=True))
    wanted = marker.removeprefix(b"event: ").decode()
    async with grpc.aio.insecure_channel(sstack.grpc_target) as channel:
        stream = grpc_call(
            sstack, who, channel, model="streamed-single", n=2 if charged else 1, partial_images=1
        )
        while (await stream.read()).type != wanted:  # type: ignore[union-attr]
            pass
        stream.cancel()
        assert await stream.code() == grpc.StatusCode.CANCELLED
    assert await settled_balance(sstack, who) == CREDIT - charged * UNIT_PRICE
    assert streamer.cancelled == 1


@pytest.mark.parametrize("front_name", FRONTS)
async def test_a_service_crashing_mid_stream_breaks_the_transfer_on_both_fronts(
    front_name: str,
) -> None:
    service = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.vanishing_service",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert service.stdout is not None
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(service.wait)
        stack.callback(lambda: service.returncode is None and service.kill())
        port = int(await asyncio.wait_for(service.stdout.readline(), 30))
        if front_name == "envoy":
            from tests.envoy_harness import envoy_front

            base_url = await stack.enter_async_context(envoy_front(port))
        else:
            runner = await start_gateway(GatewayConfig(grpc_target=f"127.0.0.1:{port}"), port=0)
            stack.push_async_callback(runner.cleanup)
            base_url = f"http://127.0.0.1:{bound_port(runner)}"
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{base_url}/v1/images/generations", json={"prompt": "x", "stream": True}
            )
            await read_until(response, b"event: image_generation.partial_image")
            assert await service.stdout.readline() == b"sent\n"
            service.kill()  # SIGKILL, by its pid: no status, no error event
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
