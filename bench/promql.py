"""Just enough PromQL to draw the dashboard's panels from scrapes taken in a test run.

Grafana and Prometheus are not available here; the dashboard's picture is drawn
from a series of real /metrics scrapes instead. Every panel query of
docs/grafana/imagegate.json is one of these shapes (tests/test_dashboard.py checks):

    sum by (a, b) (rate(metric{matchers}[$__rate_interval])) [* or / number]
    histogram_quantile(0.95, sum by (le, a) (rate(metric_bucket{matchers}[$__rate_interval])))
    metric{matchers}            max by (a) (metric{matchers})            min(metric)
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]
Series = dict[tuple[tuple[str, str], ...], list[tuple[float, float]]]

_SELECTOR = r"(?P<metric>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<matchers>[^}]*)\})?"
_RATE = re.compile(
    r"^sum(?: by \((?P<by>[^)]*)\))? ?\(rate\(" + _SELECTOR + r"\[\$__rate_interval\]\)\)"
    r"(?: (?P<op>[*/]) (?P<number>[0-9.e+-]+))?$"
)
_QUANTILE = re.compile(
    r"^histogram_quantile\((?P<q>[0-9.]+), sum by \((?P<by>[^)]*)\) \(rate\("
    + _SELECTOR
    + r"\[\$__rate_interval\]\)\)\)$"
)
_GAUGE = re.compile(
    r"^(?:(?P<agg>max|min|sum)(?: by \((?P<by>[^)]*)\))? ?\()?" + _SELECTOR + r"\)?$"
)
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!=|=)\s*"([^"]*)"\s*,?')


@dataclass(frozen=True)
class Query:
    kind: str  # rate, quantile, gauge
    metric: str
    matchers: tuple[tuple[str, str, str], ...]
    by: tuple[str, ...]
    aggregate: str = "sum"
    quantile: float = 0.0
    factor: float = 1.0


def parse(expr: str) -> Query:
    """The query, or ValueError for a shape this module does not evaluate."""
    expr = " ".join(expr.split())
    if m := _RATE.match(expr):
        factor = float(m["number"]) if m["op"] else 1.0
        return Query(
            "rate",
            m["metric"],
            _matchers(m["matchers"]),
            _by(m["by"]),
            factor=1 / factor if m["op"] == "/" else factor,
        )
    if m := _QUANTILE.match(expr):
        by = _by(m["by"])
        if "le" not in by:
            raise ValueError(f"histogram_quantile needs le in by(): {expr}")
        return Query("quantile", m["metric"], _matchers(m["matchers"]), by, quantile=float(m["q"]))
    if (m := _GAUGE.match(expr)) and (m["agg"] is None) == (not expr.endswith(")")):
        return Query("gauge", m["metric"], _matchers(m["matchers"]), _by(m["by"]), m["agg"] or "")
    raise ValueError(f"not a query shape bench/promql.py evaluates: {expr}")


def _by(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else ()


def _matchers(text: str | None) -> tuple[tuple[str, str, str], ...]:
    if not text:
        return ()
    found = _MATCHER.findall(text)
    if "".join(f'{k}{op}"{v}",' for k, op, v in found).replace(" ", "") != (
        text.replace(" ", "").rstrip(",") + ","
    ):
        raise ValueError(f"matchers not understood: {text}")
    return tuple(found)


def _matches(labels: Labels, matchers: tuple[tuple[str, str, str], ...]) -> bool:
    values = dict(labels)
    for name, op, wanted in matchers:
        value = values.get(name, "")
        if op == "=" and value != wanted:
            return False
        if op == "!=" and value == wanted:
            return False
        if op == "=~" and not re.fullmatch(wanted, value):
            return False
    return True


def evaluate(query: Query, scrapes: list[tuple[float, Samples]], window_s: float) -> Series:
    """One series per group: [(time, value)] at each scrape time (where defined)."""
    out: Series = defaultdict(list)
    for index, (t, samples) in enumerate(scrapes):
        if query.kind == "gauge":
            values = _instant(query, samples)
        else:
            earlier = _at(scrapes, index, t - window_s)
            if earlier is None:
                continue
            values = _rates(query, earlier, samples, t - earlier[0])
            if query.kind == "quantile":
                values = _quantiles(query, values)
        for group, value in values.items():
            if not math.isnan(value):
                out[group].append((t, value * query.factor))
    return dict(out)


def _at(
    scrapes: list[tuple[float, Samples]], index: int, when: float
) -> tuple[float, Samples] | None:
    """The latest scrape at or before `when` (and before `index`)."""
    for t, samples in reversed(scrapes[:index]):
        if t <= when + 1e-9:
            return t, samples
    return None


def _group(labels: Labels, by: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    values = dict(labels)
    return tuple((name, values.get(name, "")) for name in by)


def _instant(query: Query, samples: Samples) -> dict[tuple[tuple[str, str], ...], float]:
    groups: dict[tuple[tuple[str, str], ...], list[float]] = defaultdict(list)
    for (name, labels), value in samples.items():
        if name == query.metric and _matches(labels, query.matchers):
            key = _group(labels, query.by) if query.aggregate else tuple(sorted(labels))
            groups[key].append(value)
    combine = {"max": max, "min": min, "sum": sum, "": sum}[query.aggregate]
    return {key: float(combine(values)) for key, values in groups.items()}


def _rates(
    query: Query, earlier: tuple[float, Samples], samples: Samples, elapsed: float
) -> dict[tuple[tuple[str, str], ...], float]:
    _, before = earlier
    groups: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    for (name, labels), value in samples.items():
        if name != query.metric or not _matches(labels, query.matchers):
            continue
        previous = before.get((name, labels), 0.0)
        increase = value - previous if value >= previous else value  # a counter reset
        groups[_group(labels, query.by)] += increase / elapsed if elapsed > 0 else 0.0
    return dict(groups)


def _quantiles(
    query: Query, rates: dict[tuple[tuple[str, str], ...], float]
) -> dict[tuple[tuple[str, str], ...], float]:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = defaultdict(list)
    for group, rate in rates.items():
        rest = tuple((k, v) for k, v in group if k != "le")
        le = dict(group)["le"]
        buckets[rest].append((math.inf if le == "+Inf" else float(le), rate))
    result = {}
    for group, pairs in buckets.items():
        pairs.sort()
        total = pairs[-1][1] if pairs else 0.0
        if total <= 0:
            continue
        rank = query.quantile * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in pairs:
            if count >= rank:
                if math.isinf(bound):
                    result[group] = lower_bound
                else:
                    span = count - lower_count
                    share = (rank - lower_count) / span if span > 0 else 1.0
                    result[group] = lower_bound + (bound - lower_bound) * share
                break
            lower_bound, lower_count = bound, count
    return result
