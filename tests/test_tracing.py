"""OpenTelemetry tracing: one trace from the REST front through the service to the upstream,
through both fronts, recorded by the SDK's in-memory exporter; and tracing configured by
the standard OTEL_* variables in a real `imagegate serve`, exporting OTLP to a fake collector.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import tracing
from tests.conftest import FRONTS, Stack, make_tenant
from tests.fakes.openai import FakeOpenAI
from tests.providers_harness import model, provider, provider_stack, route
from tests.rest import call

PROMPT = "a lighthouse at dusk"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
SERVICE_SPAN = "imagegate.v1.ImageService/GenerateImages"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider (set once per process), exporting to memory."""
    memory = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    memory.shutdown()  # later tests' spans are dropped, not kept in memory


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    upstream = FakeOpenAI(openai_key=None, compatible_models={"flux-schnell"})
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture(scope="module")
async def tstack(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI, exporter: InMemorySpanExporter
) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("tracing"),
        providers={"compat": provider("openai_compatible", fake.openai_base, max_n=4)},
        models={"flux": model(route("compat", "flux-schnell"))},
        env={},
    ) as stack:
        yield stack


def _trace_of(spans: list[ReadableSpan], trace_id: int) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans if s.context is not None and s.context.trace_id == trace_id}


def _upstream_traceparent(fake: FakeOpenAI) -> tuple[int, int]:
    sent = {k.lower(): v for k, v in fake.requests[-1].headers.items()}
    _, trace_id, parent, _ = sent["traceparent"].split("-")
    return int(trace_id, 16), int(parent, 16)


async def _generate(base_url: str, key: str, headers: dict[str, str]) -> str:
    reply = await call(
        "POST",
        f"{base_url}/v1/images/generations",
        key=key,
        json_body={"model": "flux", "prompt": PROMPT, "response_format": "b64_json"},
        headers=headers,
    )
    assert reply.status == 200, reply.body[:300]
    return reply.headers["x-request-id"]


async def test_aiohttp_front_starts_the_trace_and_it_reaches_the_upstream(
    tstack: Stack, fake: FakeOpenAI, exporter: InMemorySpanExporter
) -> None:
    tenant = await make_tenant(tstack.service)
    exporter.clear()
    request_id = await _generate(tstack.fronts["aiohttp"], tenant.key, {})
    trace_id, parent = _upstream_traceparent(fake)
    spans = _trace_of(list(exporter.get_finished_spans()), trace_id)
    front = spans["POST /v1/images/generations"]
    service = spans[SERVICE_SPAN]
    upstream = spans["upstream compat"]
    # One trace: front -> service (over gRPC metadata) -> upstream attempt -> the fake.
    assert front.parent is None
    assert service.parent is not None and service.parent.span_id == front.context.span_id
    assert upstream.context.span_id == parent
    assert {"imagegate.auth", "imagegate.reserve", "imagegate.upstream", "imagegate.settle"} <= set(
        spans
    )
    assert service.attributes["imagegate.request_id"] == request_id
    assert service.attributes["rpc.grpc.status_code"] == 0
    assert upstream.attributes["imagegate.outcome"] == "ok"
    assert front.attributes["http.response.status_code"] == 200
    # The request id travels too: the OpenAI-compatible upstream gets it.
    assert fake.requests[-1].headers["X-Client-Request-Id"] == request_id


@pytest.mark.parametrize("front", FRONTS)
async def test_a_client_trace_is_continued_through_each_front(
    tstack: Stack, fake: FakeOpenAI, exporter: InMemorySpanExporter, front: str
) -> None:
    tenant = await make_tenant(tstack.service)
    exporter.clear()
    headers = {"traceparent": CLIENT_TRACEPARENT, "x-request-id": f"trace-{front}"}
    await _generate(tstack.fronts[front], tenant.key, headers)
    trace_id, _ = _upstream_traceparent(fake)
    assert trace_id == int(CLIENT_TRACE, 16)
    spans = _trace_of(list(exporter.get_finished_spans()), trace_id)
    service = spans[SERVICE_SPAN]
    assert service.parent is not None
    if front == "aiohttp":
        assert spans["POST /v1/images/generations"].parent.span_id == int(CLIENT_PARENT, 16)
    else:
        # Envoy (its own tracing off) passes the client's traceparent on untouched.
        assert service.parent.span_id == int(CLIENT_PARENT, 16)
    assert service.attributes["imagegate.request_id"] == f"trace-{front}"
    assert fake.requests[-1].headers["X-Client-Request-Id"] == f"trace-{front}"


def test_tracing_is_off_without_otel_variables_and_imports_no_sdk() -> None:
    script = (
        "import sys; import service.cli; from service import tracing; "
        "assert tracing.exporters({}) == []; assert tracing.configure({}) is None; "
        "assert not tracing.active(); "
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')], 'sdk'"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    assert tracing.exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}) == ["otlp"]
    assert tracing.exporters({"OTEL_TRACES_EXPORTER": "none"}) == []
    on = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}
    assert tracing.exporters(on) == []


async def test_otel_variables_turn_on_otlp_export_in_imagegate_serve(tmp_path: Path) -> None:
    """A real `imagegate serve` with OTEL_EXPORTER_OTLP_ENDPOINT: spans of the front and
    the service of one request arrive at the collector in OTLP/HTTP, in one trace."""
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(
            body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    collector = f"http://127.0.0.1:{runner.addresses[0][1]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "imagegate-test",
        "PYTHONUNBUFFERED": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--demo",
        "--data-dir",
        str(tmp_path),
        "--rest-port",
        "0",
        "--grpc-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    try:
        assert proc.stdout is not None
        output = b""
        async with asyncio.timeout(60):
            while b"Ctrl-C stops" not in output:
                line = await proc.stdout.readline()
                assert line, output.decode()
                output += line
        text = output.decode()
        key = text.split("Your API key (shown once, keep it): ")[1].split()[0]
        rest = text.split("imagegate: REST on ")[1].split(",")[0]
        reply = await call(
            "POST",
            f"{rest}/v1/images/generations",
            key=key,
            json_body={"model": "local", "prompt": PROMPT, "size": "256x256"},
        )
        assert reply.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0  # spans flushed on the way out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()
    spans = [
        (resource.resource, span)
        for message in received
        for resource in message.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    by_name = {span.name: span for _, span in spans}
    front, service = by_name["POST /v1/images/generations"], by_name[SERVICE_SPAN]
    assert front.trace_id == service.trace_id and service.parent_span_id == front.span_id
    names = {
        a.value.string_value for r, _ in spans for a in r.attributes if a.key == "service.name"
    }
    assert names == {"imagegate-test"}
