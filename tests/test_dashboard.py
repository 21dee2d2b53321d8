"""The Grafana dashboard in docs/ queries metrics that exist, in shapes its picture's
renderer evaluates; the renderer's PromQL agrees with Prometheus on simple cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import gateway.telemetry  # noqa: F401  (registers the front's metrics)
from bench import promql
from service import metrics

DOCS = Path(__file__).resolve().parents[1] / "docs" / "grafana"
DASHBOARD = json.loads((DOCS / "imagegate.json").read_text())
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _exported() -> set[str]:
    metrics.service_gauges()
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def _targets() -> list[dict[str, str]]:
    return [t for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def test_every_panel_queries_an_exported_metric_in_a_drawable_shape() -> None:
    exported = _exported()
    panels = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
    used = set()
    for target in _targets():
        query = promql.parse(target["expr"])
        assert query.metric in exported, query.metric
        used.add(query.metric.removesuffix("_bucket").removesuffix("_total"))
    # Each family the README lists is on the dashboard.
    for name in (
        "imagegate_requests",
        "imagegate_request_duration_seconds",
        "imagegate_stage_duration_seconds",
        "imagegate_upstream_call_duration_seconds",
        "imagegate_upstream_calls",
        "imagegate_images_generated",
        "imagegate_reserved_micros",
        "imagegate_settled_micros",
        "imagegate_released_micros",
        "imagegate_open_reservations",
        "imagegate_oldest_open_reservation_age_seconds",
        "imagegate_breaker_state",
        "imagegate_ready",
        "grpc_server_handled",
        "imagegate_http_requests",
        "imagegate_http_request_duration_seconds",
    ):
        assert name in used, name
    assert (DOCS / "imagegate.png").stat().st_size > 10_000


def _scrape(t: float, **values: float) -> tuple[float, promql.Samples]:
    samples: promql.Samples = {}
    for key, value in values.items():
        name, _, le = key.partition("__le_")
        bound = "+Inf" if le == "Inf" else le
        labels = frozenset({("route", "a"), *([("le", bound)] if le else [])})
        samples[(name, labels)] = value
    return t, samples


def test_rate_and_histogram_quantile_as_prometheus_computes_them() -> None:
    scrapes = [
        _scrape(0, c_total=0, h_bucket__le_1=0, h_bucket__le_2=0, h_bucket__le_Inf=0),
        _scrape(10, c_total=50, h_bucket__le_1=10, h_bucket__le_2=30, h_bucket__le_Inf=40),
    ]
    rate = promql.evaluate(
        promql.parse("sum by (route) (rate(c_total[$__rate_interval])) * 2"), scrapes, 10
    )
    assert rate == {(("route", "a"),): [(10, 10.0)]}
    p50 = promql.evaluate(
        promql.parse("histogram_quantile(0.5, sum by (le) (rate(h_bucket[$__rate_interval])))"),
        scrapes,
        10,
    )
    # 20 of 40 lands in (1, 2], 10 of that bucket's 20 in: 1.5.
    assert p50 == {(): [(10, 1.5)]}
    with pytest.raises(ValueError, match="not a query shape"):
        promql.parse("rate(c_total[5m])")
