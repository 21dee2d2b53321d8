"""The server interceptor: gRPC metrics for every call; for ImageService calls also the
request record and its log line, the server span (W3C context from the metadata,
where both fronts and Envoy put `traceparent`), and the drain's gate."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from service import metrics, observe, tracing
from service.lifecycle import ADMIN_SERVICE_NAME, SERVICE_NAME, InFlight

log = logging.getLogger("imagegate.request")
tracer = trace.get_tracer("imagegate.service")
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
SHUTTING_DOWN = "The service is shutting down. Please retry."
# Request ids kept as sent when they are safe to log, store and echo, else replaced.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class Observer(grpc.aio.ServerInterceptor):
    def __init__(self, drain: InFlight) -> None:
        self._drain = drain
        # Per method: the handler wrapped last time, and its wrapping (made once).
        self._made: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        made = self._made.get(details.method)
        if made is None or made[0] is not handler:
            made = (handler, self._wrap(handler, details.method))
            self._made[details.method] = made
        return made[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
        service, _, method = name.lstrip("/").partition("/")
        # The admin API's calls too: logged (an audit trail naming the admin key),
        # traced, and refused during a drain like ImageService's.
        tracked = service in (SERVICE_NAME, ADMIN_SERVICE_NAME)
        observed = _Call(self._drain, service, method, tracked)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                observed.unary(handler.unary_unary, "unary"),
                handler.request_deserializer,
                handler.response_serializer,
            )
        behavior = handler.unary_stream
        if behavior is not None and inspect.isasyncgenfunction(behavior):
            wrapped: Any = observed.stream(behavior)
        elif behavior is not None and inspect.iscoroutinefunction(behavior):
            # A stream written with context.write (StreamImages, health's Watch).
            wrapped = observed.unary(behavior, "server_stream")
        else:
            return handler  # client streaming: none in this service, left as it is
        return grpc.unary_stream_rpc_method_handler(
            wrapped, handler.request_deserializer, handler.response_serializer
        )


class _Call:
    """One method's wrapping; `tracked` calls (ImageService, AdminService) get the record,
    span and gate."""

    def __init__(self, drain: InFlight, service: str, method: str, tracked: bool) -> None:
        self.drain, self.service, self.method, self.tracked = drain, service, method, tracked

    def unary(
        self, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], kind: str
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            run = _Run(self, context, kind)
            with run:
                try:
                    await run.gate()
                    return await behavior(request, context)
                except asyncio.CancelledError:
                    await run.cancelled()
                    raise

        return observed

    def stream(
        self, behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            run = _Run(self, context, "server_stream")
            with run:
                try:
                    await run.gate()
                    async for reply in behavior(request, context):
                        yield reply
                except asyncio.CancelledError:
                    await run.cancelled()
                    raise

        return observed


class _Run:
    """One call in progress: counted, timed, traced, logged once at its end."""

    def __init__(self, call: _Call, context: grpc.aio.ServicerContext, kind: str) -> None:
        self.call, self.context, self.kind = call, context, kind
        self.task: asyncio.Task[Any] | None = asyncio.current_task()
        self.started = time.monotonic()
        self.deadline = context.time_remaining() is not None

    def __enter__(self) -> _Run:
        call = self.call
        metrics.child(metrics.GRPC_STARTED, self.kind, call.service, call.method).inc()
        if not call.tracked:
            return self
        metadata = _metadata(self.context)
        self.record = observe.RequestRecord(request_id(metadata.get("x-request-id")), call.method)
        self.record.traced = tracing.active()
        self.token = observe.begin(self.record)
        self.span: trace.Span | None = None
        self.context_token: object = None
        if self.record.traced:
            self.span_cm = tracer.start_as_current_span(
                f"{call.service}/{call.method}",
                context=propagate.extract(metadata),
                kind=SpanKind.SERVER,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": call.service,
                    "rpc.method": call.method,
                    "imagegate.request_id": self.record.request_id,
                },
            )
            self.span = self.span_cm.__enter__()
        elif "traceparent" in metadata:
            # Not tracing here: the caller's context still goes on to the upstream.
            self.context_token = otel_context.attach(propagate.extract(metadata))
        if self.task is not None:
            self.call.drain.enter(self.task)
        return self

    async def gate(self) -> None:
        """During a drain, new calls are refused: the caller retries elsewhere."""
        if self.call.tracked and self.call.drain.draining:
            await self.context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    async def cancelled(self) -> None:
        """Cancelled by the drain: answer UNAVAILABLE (the core has released the money)."""
        if self.task is not None and self.call.drain.forced(self.task):
            await self.context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        remaining = self.context.time_remaining()
        self.cancel_code = (
            "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        )

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        code = self._code(kind)
        elapsed = time.monotonic() - self.started
        call = self.call
        metrics.child(metrics.GRPC_HANDLED, self.kind, call.service, call.method, code).inc()
        metrics.child(metrics.GRPC_SECONDS, self.kind, call.service, call.method).observe(elapsed)
        if not call.tracked:
            return
        if self.task is not None:
            call.drain.leave(self.task)
        record = self.record
        record.status = code
        record.reason = _reason(self.context) if code != "OK" else None
        model = record.model or ""
        metrics.child(metrics.REQUESTS, call.method, model, code, record.reason or "").inc()
        metrics.child(metrics.REQUEST_SECONDS, call.method, model).observe(elapsed)
        if self.span is not None:
            self._finish_span(self.span, code)
            self.span_cm.__exit__(None, None, None)
        elif self.context_token is not None:
            with contextlib.suppress(ValueError):
                otel_context.detach(self.context_token)  # type: ignore[arg-type]
        with contextlib.suppress(ValueError):  # a stream closed from another context
            observe.end(self.token)
        log.info("%s %s", call.method, code, extra={"fields": record.fields()})

    def _code(self, kind: type[BaseException] | None) -> str:
        code = self.context.code()
        if code is not None and code != grpc.StatusCode.OK:
            return str(code.name)
        if kind is None:
            return "OK"
        if issubclass(kind, asyncio.CancelledError):
            return getattr(self, "cancel_code", "CANCELLED")
        return "UNKNOWN"

    def _finish_span(self, span: trace.Span, code: str) -> None:
        record = self.record
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
        for name, value in record.fields().items():
            if value is not None and name not in ("request_id", "rpc", "status"):
                span.set_attribute(f"imagegate.{name}", value)
        # Caller mistakes (4xx) are not the server's errors; OpenTelemetry's gRPC rule.
        if code in ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS"):
            span.set_status(Status(StatusCode.ERROR, record.reason or code))


def request_id(sent: str | None) -> str:
    """The caller's x-request-id if it is safe to log and echo, else a new one."""
    return sent if sent is not None and REQUEST_ID_RE.fullmatch(sent) else uuid.uuid4().hex


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def _reason(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.trailing_metadata() or ():
        if key == "imagegate-reason" and isinstance(value, str):
            return value
    return None
