"""OpenTelemetry tracing: off unless the standard OTEL_* variables ask for it.

Spans are made through the OpenTelemetry API everywhere (a no-op until a
provider is set); only `configure()` imports the SDK and an exporter, and only
when tracing is on:
- OTEL_SDK_DISABLED=true: off, whatever else is set;
- OTEL_TRACES_EXPORTER: otlp, console, or none (several comma-separated);
- else on, with otlp, when OTEL_EXPORTER_OTLP_ENDPOINT or
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; off otherwise.
OTLP's protocol comes from OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or
OTEL_EXPORTER_OTLP_PROTOCOL (http/protobuf by default, or grpc); the exporter,
the sampler (OTEL_TRACES_SAMPLER), the batch processor (OTEL_BSP_*) and the
resource (OTEL_SERVICE_NAME, default "imagegate"; OTEL_RESOURCE_ATTRIBUTES)
read their own variables, as the SDK documents them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace

INSTALL_HINT = "pip install 'imagegate[tracing]'"


def active() -> bool:
    """Whether a tracer provider is set (by configure(), or by a test): spans are made
    only then; otherwise requests pay nothing for tracing."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def exporters(env: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for; [] means tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return [n.strip() for n in named.split(",") if n.strip() and n.strip() != "none"]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ["otlp"]
    return []


def configure(env: Mapping[str, str] | None = None) -> Callable[[], None] | None:
    """Set the global tracer provider when the environment enables tracing.

    Returns the provider's shutdown (it flushes what is buffered), or None when off.
    ValueError for an unknown exporter or a missing SDK: start-up stops, saying which.
    """
    env = os.environ if env is None else env
    names = exporters(env)
    if not names:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ValueError(
            f"tracing is on (OTEL_* variables) but the OpenTelemetry SDK is missing: {INSTALL_HINT}"
        ) from None
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "imagegate"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    trace.set_tracer_provider(provider)
    return provider.shutdown


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: imagegate knows otlp, console and none")
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    modules = {
        "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    }
    if protocol not in modules:
        raise ValueError(f"OTLP protocol {protocol!r}: use http/protobuf or grpc")
    try:
        module = importlib.import_module(modules[protocol])
    except ImportError:
        raise ValueError(f"the OTLP {protocol} exporter is not installed: {INSTALL_HINT}") from None
    return module.OTLPSpanExporter()
