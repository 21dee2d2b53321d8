"""The trace context sent upstream: each HTTP request of a provider session carries the
current span's W3C `traceparent` (the upstream attempt's span, see observed.py)."""

from __future__ import annotations

from types import SimpleNamespace

import aiohttp
from opentelemetry import propagate, trace


async def _inject(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceRequestStartParams,
) -> None:
    # A no-op without a valid span context: nothing is sent when no trace is going on.
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    for name, value in carrier.items():
        params.headers[name] = value


def trace_configs() -> list[aiohttp.TraceConfig]:
    """The hook that sends the trace context, when tracing is on (it is set up before
    the providers); none otherwise, as hooks cost every upstream request a few signals."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return []
    config = aiohttp.TraceConfig()
    config.on_request_start.append(_inject)
    return [config]
