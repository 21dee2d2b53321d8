"""The service's Prometheus metrics: defined once here, recorded where things happen.

Counters and histograms are per process; with `serve --workers N` each worker
writes them to PROMETHEUS_MULTIPROC_DIR (set by the supervisor before it
spawns them) and one scrape sums every worker (admin_http.py). The gauges
hold a value per process too; `multiprocess_mode` says how a scrape combines
the live workers' (the supervisor forgets a dead one's with mark_dead()): the
store's figures are the same whichever worker read them last ("mostrecent"),
a route's breaker shows its worst state in any worker ("max"), readiness the
least ready worker ("min").
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar, cast

from prometheus_client import Counter, Gauge, Histogram

# From a cached local render (milliseconds) to the slowest upstream (minutes).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

REQUESTS = Counter(
    "imagegate_requests",
    "ImageService calls by RPC, model (empty before it is validated), gRPC status and "
    "imagegate error reason (empty on success).",
    ["rpc", "model", "status", "reason"],
)
REQUEST_SECONDS = Histogram(
    "imagegate_request_duration_seconds",
    "ImageService calls end to end inside the service, by RPC and model.",
    ["rpc", "model"],
    buckets=LATENCY_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "imagegate_stage_duration_seconds",
    "Time spent in each stage of a generation: auth, reserve, upstream, store (writing "
    "image files), settle (settling or releasing the reservation).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_CALLS = Counter(
    "imagegate_upstream_calls",
    "Upstream attempts by route and outcome (ok, error, timeout, refused, cancelled).",
    ["provider", "upstream_model", "outcome"],
)
UPSTREAM_SECONDS = Histogram(
    "imagegate_upstream_call_duration_seconds",
    "Duration of each upstream attempt, by route and outcome.",
    ["provider", "upstream_model", "outcome"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_IMAGES = Counter(
    "imagegate_upstream_images",
    "Images received from each route.",
    ["provider", "upstream_model"],
)
IMAGES = Counter(
    "imagegate_images_generated",
    "Images delivered to callers and charged, by model.",
    ["model"],
)
# The ledger's movements: reserved = -(reserve rows), released = refund rows,
# settled = what reserved minus released leaves charged once a reservation is resolved.
RESERVED = Counter(
    "imagegate_reserved_micros", "Micro-USD held by reservations, by model.", ["model"]
)
SETTLED = Counter(
    "imagegate_settled_micros", "Micro-USD charged when reservations settled, by model.", ["model"]
)
RELEASED = Counter(
    "imagegate_released_micros",
    "Micro-USD given back when reservations settled below their hold or were released.",
    ["model"],
)
BREAKER_STATE = Gauge(
    "imagegate_breaker_state",
    "Circuit breaker of each route that has been called: 0 closed, 1 half-open, 2 open.",
    ["provider", "upstream_model"],
    multiprocess_mode="livemax",
)

# gRPC server metrics, named as go-grpc-prometheus and py-grpc-prometheus name them.
_GRPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
GRPC_STARTED = Counter("grpc_server_started", "RPCs started on the server.", _GRPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled", "RPCs completed on the server.", [*_GRPC_LABELS, "grpc_code"]
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC on the server, to its status.",
    _GRPC_LABELS,
    buckets=LATENCY_BUCKETS,
)

BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
M = TypeVar("M", Counter, Gauge, Histogram)


def child(metric: M, *labels: str) -> M:
    """metric.labels(*labels), remembered: prometheus_client takes 6 us to find it."""
    return cast(M, _child(metric, labels))


@functools.lru_cache(maxsize=4096)
def _child(metric: Counter | Gauge | Histogram, labels: tuple[str, ...]) -> object:
    return metric.labels(*labels)


def reserved(model: str, amount: int) -> None:
    """A reservation committed."""
    child(RESERVED, model).inc(amount)


def resolved(model: str, amount: int, cost: int) -> None:
    """A held reservation of `amount` committed as settled for `cost` (0: released)."""
    if cost:
        child(SETTLED, model).inc(cost)
    if amount - cost:
        child(RELEASED, model).inc(amount - cost)


@dataclass(frozen=True)
class ServiceGauges:
    open_reservations: Gauge
    oldest_reservation_age: Gauge
    ready: Gauge


@functools.cache
def service_gauges() -> ServiceGauges:
    """Made when a service starts: a process running only the REST front exports none
    (a gauge without labels always has a sample)."""
    return ServiceGauges(
        Gauge(
            "imagegate_open_reservations",
            "Reservations held now (every process of the database), read from the store.",
            multiprocess_mode="livemostrecent",
        ),
        Gauge(
            "imagegate_oldest_open_reservation_age_seconds",
            "Age of the oldest reservation held now; 0 when none is.",
            multiprocess_mode="livemostrecent",
        ),
        Gauge(
            "imagegate_ready",
            "1 while the service reports SERVING (database and catalog ready, not draining).",
            multiprocess_mode="livemin",
        ),
    )


def open_reservations(count: int, oldest_age_s: float) -> None:
    gauges = service_gauges()
    gauges.open_reservations.set(count)
    gauges.oldest_reservation_age.set(oldest_age_s)


def ready(serving: bool) -> None:
    service_gauges().ready.set(1 if serving else 0)


def breakers(states: Iterable[tuple[str, str, str]]) -> None:
    """(provider, upstream_model, state) of every route with a breaker."""
    for provider, upstream_model, state in states:
        child(BREAKER_STATE, provider, upstream_model).set(BREAKER_VALUES.get(state, 2))


def mark_dead(pid: int) -> None:
    """A worker of `serve --workers N` ended: drop its gauges from the multiprocess scrape."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
