"""One upstream attempt, observed: a client span, and its duration and outcome per route.

The span is current while the adapter runs, so the HTTP session's trace hook
(service/tracing.py) sends its `traceparent` to the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from opentelemetry.trace import SpanKind, Status, StatusCode

from service import metrics, observe
from service.errors import ContentPolicy, UpstreamRejected
from service.providers.base import UpstreamCall


@dataclass
class Seen:
    images: int = 0


@contextlib.contextmanager
def upstream_observed(
    provider: str, call: UpstreamCall, *, timed_out: type[Exception]
) -> Iterator[Seen]:
    seen = Seen()
    started = time.monotonic()
    attributes = {
        "imagegate.provider": provider,
        "imagegate.upstream_model": call.upstream_model,
        "imagegate.n": call.n,
        "imagegate.request_id": call.request_id,
    }
    with observe.span(
        f"upstream {provider}",
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        outcome = "error"
        try:
            yield seen
            outcome = "ok"
        except timed_out:
            outcome = "timeout"
            raise
        except (ContentPolicy, UpstreamRejected):
            outcome = "refused"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            elapsed = time.monotonic() - started
            labels = (provider, call.upstream_model)
            metrics.child(metrics.UPSTREAM_CALLS, *labels, outcome).inc()
            metrics.child(metrics.UPSTREAM_SECONDS, *labels, outcome).observe(elapsed)
            if seen.images:
                metrics.child(metrics.UPSTREAM_IMAGES, *labels).inc(seen.images)
            if span is not None:
                span.set_attribute("imagegate.outcome", outcome)
                span.set_attribute("imagegate.images", seen.images)
                if outcome in ("error", "timeout"):
                    span.set_status(Status(StatusCode.ERROR, outcome))
