"""The front's own telemetry: a metrics count and a JSON log line per request, its server
span (W3C context from the client's headers, passed on to the service as gRPC
metadata), and the drain: new requests refused, those in flight waited for.

The outermost middleware: it sees every request and the final response,
whatever the error middleware inside it made of a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram

from gateway import errors, http_input

log = logging.getLogger("imagegate.access")
tracer = trace.get_tracer("imagegate.gateway")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = "x-request-id"
# Kubernetes probes: answered during a drain, not written to the log at info.
PROBES = frozenset({"/healthz", "/readyz"})
# Headers of the W3C trace context, passed through as they are when not tracing here.
TRACE_HEADERS = ("traceparent", "tracestate")

# As the service's LATENCY_BUCKETS (service/metrics.py): a request can take minutes.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
HTTP_REQUESTS = Counter(
    "imagegate_http_requests",
    "REST requests by route (the path pattern; 'other' for unknown paths), method, HTTP "
    "status and OpenAI error code (empty on success).",
    ["route", "method", "status", "code"],
)
HTTP_SECONDS = Histogram(
    "imagegate_http_request_duration_seconds",
    "REST requests end to end in the front, by route and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)


class Lifecycle:
    """The front's requests in flight, and whether it is draining."""

    def __init__(self) -> None:
        self.draining = False
        self._requests: set[asyncio.Task[object]] = set()
        self._forced: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, task: asyncio.Task[object]) -> None:
        self._requests.add(task)
        self._idle.clear()

    def leave(self, task: asyncio.Task[object]) -> None:
        self._requests.discard(task)
        self._forced.discard(task)
        if not self._requests:
            self._idle.set()

    def forced(self, task: asyncio.Task[object] | None) -> bool:
        return task in self._forced

    async def drain(self, grace_s: float, force: asyncio.Event) -> None:
        """Refuse new requests; wait for those in flight until the grace period ends or
        `force` is set; cancel the rest (their service calls are cancelled with them,
        and the service releases what they held) and wait until they have answered."""
        self.draining = True
        idle = asyncio.ensure_future(self._idle.wait())
        forced = asyncio.ensure_future(force.wait())
        try:
            await asyncio.wait({idle, forced}, timeout=grace_s, return_when="FIRST_COMPLETED")
        finally:
            idle.cancel()
            forced.cancel()
        left = list(self._requests)
        if left:
            log.warning("drain: cancelling %d requests still in flight", len(left))
        for task in left:
            self._forced.add(task)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*left, return_exceptions=True)


LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle", Lifecycle)


def tracing_active() -> bool:
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def trace_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata (empty when there is none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def passed_through(request: web.Request) -> list[tuple[str, str]]:
    """Not tracing here: the client's own trace headers go on to the service unchanged,
    as Envoy passes every header."""
    return [
        (name, value)
        for name in TRACE_HEADERS
        if (value := http_input.metadata_value(request.raw_headers, name.encode())) is not None
    ]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    life = request.app[LIFECYCLE]
    task = asyncio.current_task()
    span_cm: contextlib.AbstractContextManager[trace.Span | None] = contextlib.nullcontext()
    if tracing_active():
        span_cm = tracer.start_as_current_span(
            f"{request.method} {_route(request)}",
            context=propagate.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": _path(request)},
        )
    with span_cm as span:
        if task is not None:
            life.enter(task)
        try:
            if life.draining and _path(request) not in PROBES:
                response: web.StreamResponse = _unavailable(request)
            else:
                response = await handler(request)
        except asyncio.CancelledError:
            # A stream that has begun cannot become a 503: it is cut, as a client sees
            # a service that goes away mid-stream.
            if task is None or not life.forced(task) or request.writer.output_size:
                raise
            task.uncancel()  # the drain's cancellation is answered, not passed on
            response = _unavailable(request)
        finally:
            if task is not None:
                life.leave(task)
        _finish(request, response, span, time.monotonic() - started)
    return response


def _unavailable(request: web.Request) -> web.Response:
    """503 while draining, as the service answers: the client retries elsewhere."""
    request_id = http_input.request_id(request.headers)
    row = errors.UNAVAILABLE
    return web.Response(
        status=row.status,
        body=errors.error_body(row),
        headers={"Content-Type": "application/json", REQUEST_ID: request_id},
    )


def _finish(
    request: web.Request, response: web.StreamResponse, span: trace.Span | None, elapsed: float
) -> None:
    route, status, code = _route(request), response.status, error_code(response)
    _child(HTTP_REQUESTS, (route, request.method, str(status), code or "")).inc()
    _child(HTTP_SECONDS, (route, request.method)).observe(elapsed)
    if span is not None:
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, code or str(status)))
    fields = {
        "request_id": response.headers.get(REQUEST_ID),
        "method": request.method,
        # The path only: a query may carry an image URL's signature.
        "path": _path(request),
        "route": route,
        "status": status,
        "code": code,
        "total_ms": round(elapsed * 1000, 1),
    }
    level = logging.DEBUG if _path(request) in PROBES else logging.INFO
    log.log(level, "%s %s %d", request.method, _path(request), status, extra={"fields": fields})


@functools.lru_cache(maxsize=1024)
def _child(metric: Any, labels: tuple[str, ...]) -> Any:
    """metric.labels(*labels), remembered: prometheus_client takes 6 us to find it."""
    return metric.labels(*labels)


def error_code(response: web.StreamResponse) -> str | None:
    """error.code of an OpenAI error body (small, already made), else None."""
    body = getattr(response, "body", None)
    if response.status < 400 or not isinstance(body, bytes) or len(body) > 4096:
        return None
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _path(request: web.Request) -> str:
    return request.rel_url.raw_path


def _route(request: web.Request) -> str:
    """The route's pattern: bounded label values, whatever paths clients send."""
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    return canonical if canonical.startswith("/") and "{path" not in canonical else "other"
