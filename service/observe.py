"""What one request did, gathered as it runs: its log line, its stage timings and spans.

The gRPC interceptor (grpc_observe.py) opens a RequestRecord per call; the core
fills it in as it learns who called and what was served (`current()`), and
times its stages with `stage()`. When the call ends, the interceptor writes one
log line from it and counts it. No grpc here: the core uses this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from service import metrics

# One line per request, at info; its fields are the record's (see fields()).
log = logging.getLogger("imagegate.request")
tracer = trace.get_tracer("imagegate.service")


@dataclass
class RequestRecord:
    request_id: str
    rpc: str
    started: float = field(default_factory=time.monotonic)
    key_id: str | None = None
    account: str | None = None
    model: str | None = None
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    # provider/upstream_model of the route(s) that served it (","-joined when several).
    route: str | None = None
    images: int | None = None
    cost_micros: int | None = None
    # What the route(s) list the images at (margins).
    upstream_cost_micros: int | None = None
    upstream_s: float | None = None
    # The gRPC status name, and the imagegate reason of an error.
    status: str = "OK"
    reason: str | None = None
    # Whether spans are made (tracing on): without it, stages are only timed.
    traced: bool = False

    def fields(self) -> dict[str, Any]:
        """The log line's fields: never a key, a prompt or image bytes."""
        total = time.monotonic() - self.started
        return {
            "request_id": self.request_id,
            "rpc": self.rpc,
            "key_id": self.key_id,
            "account": self.account,
            "model": self.model,
            "n": self.n,
            "size": self.size,
            "quality": self.quality,
            "route": self.route,
            "images": self.images,
            "status": self.status,
            "reason": self.reason,
            "cost_micros": self.cost_micros,
            "upstream_cost_micros": self.upstream_cost_micros,
            "upstream_ms": None if self.upstream_s is None else round(self.upstream_s * 1000, 1),
            "total_ms": round(total * 1000, 1),
        }


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "imagegate_request", default=None
)


def current() -> RequestRecord:
    """This request's record; a detached one outside an RPC (tests calling the core)."""
    record = _current.get()
    return RequestRecord(request_id="", rpc="") if record is None else record


def begin(record: RequestRecord) -> contextvars.Token[RequestRecord | None]:
    return _current.set(record)


def end(token: contextvars.Token[RequestRecord | None]) -> None:
    _current.reset(token)


def span(name: str, **options: Any) -> contextlib.AbstractContextManager[Any]:
    """A span of this request when it is traced; nothing (and no cost) otherwise."""
    if not current().traced:
        return contextlib.nullcontext()
    return tracer.start_as_current_span(name, **options)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a stage of the request (histogram by stage), in a span of its own if traced."""
    started = time.monotonic()
    with span(f"imagegate.{name}"):
        try:
            yield
        finally:
            elapsed = time.monotonic() - started
            metrics.child(metrics.STAGE_SECONDS, name).observe(elapsed)
            if name == "upstream":
                record = current()
                record.upstream_s = (record.upstream_s or 0.0) + elapsed
