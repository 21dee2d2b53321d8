"""Draw docs/grafana/imagegate.png: the dashboard's panels, from real /metrics scrapes.

Grafana cannot be installed here, so this is not a Grafana screenshot: it runs
the service and the aiohttp front in process with a fake OpenAI-compatible
upstream, drives a short mixed workload through the REST front (successes,
slow upstream answers, 401, 402, 400, an upstream outage that opens the
breaker), scrapes the admin listener's /metrics every few seconds, evaluates
each panel query of docs/grafana/imagegate.json over those scrapes
(bench/promql.py) and draws the panels with matplotlib.

    .venv/bin/pip install matplotlib
    .venv/bin/python bench/dashboard_picture.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from bench import promql
from service import keys
from service.admin_http import admin_url, start_admin
from tests.fakes.base import Fault
from tests.fakes.openai import FakeOpenAI
from tests.ops_kit import parse
from tests.providers_harness import model, provider, provider_stack, route

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana" / "imagegate.json"
PICTURE = REPO / "docs" / "grafana" / "imagegate.png"
SCRAPE_EVERY_S = 2.0
# Grafana's $__rate_interval: four scrape intervals.
RATE_WINDOW_S = 4 * SCRAPE_EVERY_S


async def workload(seconds: float, scrapes: list[tuple[float, promql.Samples]]) -> None:
    fake = FakeOpenAI(openai_key=None, compatible_models={"flux-schnell"})
    fake.stall_s = 1.2  # a STALL is a slow answer here
    await fake.start()
    with tempfile.TemporaryDirectory() as tmp:
        async with provider_stack(
            Path(tmp),
            providers={"compat": provider("openai_compatible", fake.openai_base, max_n=4)},
            models={"flux": model(route("compat", "flux-schnell"))},
            env={},
            envoy=False,
            dispatch={"max_attempts": 2, "breaker_failures": 3, "breaker_cooldown_s": 4},
        ) as stack:
            store = stack.service.store
            tenants = {}
            for name, credit in (("rich", 10**9), ("poor", 1)):
                await store.create_account(name, credit)
                key = keys.new_key()
                await store.create_key(name, keys.hash_key(key), keys.display_prefix(key), "", None)
                tenants[name] = key
            admin = await start_admin("127.0.0.1:0", stack.service.refresh_gauges)
            assert admin is not None
            url = f"{admin_url(admin)}/metrics"
            front = stack.fronts["aiohttp"] + "/v1/images/generations"
            started = time.monotonic()
            async with aiohttp.ClientSession() as http:
                stop = asyncio.Event()
                tasks = [
                    asyncio.create_task(_scrape(http, url, started, scrapes, stop)),
                    asyncio.create_task(_outage(fake, started, seconds, stop)),
                    asyncio.create_task(_drive(http, front, tenants, fake, stop)),
                ]
                await asyncio.sleep(seconds)
                stop.set()
                await asyncio.gather(*tasks)
            await admin.cleanup()
    await fake.stop()


async def _scrape(
    http: aiohttp.ClientSession,
    url: str,
    started: float,
    scrapes: list[tuple[float, promql.Samples]],
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        async with http.get(url) as reply:
            text = await reply.text()
        scrapes.append((time.monotonic() - started, parse(text).samples))
        await asyncio.sleep(SCRAPE_EVERY_S)


async def _outage(fake: FakeOpenAI, started: float, seconds: float, stop: asyncio.Event) -> None:
    """The upstream fails every call from 35% to 55% of the run."""
    while not stop.is_set():
        share = (time.monotonic() - started) / seconds
        if 0.35 <= share < 0.55:
            fake.faults.extend([Fault.SERVER_ERROR] * max(0, 8 - len(fake.faults)))
        elif fake.faults and all(f is Fault.SERVER_ERROR for f in fake.faults):
            fake.faults.clear()
        await asyncio.sleep(0.1)


async def _drive(
    http: aiohttp.ClientSession,
    front: str,
    tenants: dict[str, str],
    fake: FakeOpenAI,
    stop: asyncio.Event,
) -> None:
    """About four requests a second, of these kinds."""
    rng = random.Random(7)
    pending: set[asyncio.Task[None]] = set()
    kinds = ["local"] * 8 + ["flux"] * 6 + ["slow"] * 2 + ["poor", "badkey", "badsize"]
    for count in itertools.count():
        if stop.is_set():
            break
        kind = rng.choice(kinds)
        body: dict[str, Any] = {
            "model": "flux",
            "prompt": f"p{count}",
            "response_format": "b64_json",
        }
        key = tenants["rich"]
        if kind == "local":
            body = {"model": "local", "prompt": f"p{count}", "size": "256x256"}
        elif kind == "slow" and not fake.faults:
            fake.inject(Fault.STALL)
        elif kind == "poor":
            key = tenants["poor"]
        elif kind == "badkey":
            key = keys.new_key()
        elif kind == "badsize":
            body["size"] = "3x3"
        task = asyncio.create_task(_post(http, front, key, body))
        pending.add(task)
        task.add_done_callback(pending.discard)
        await asyncio.sleep(rng.expovariate(4.0))
    await asyncio.gather(*pending)


async def _post(http: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(url, json=body, headers=headers) as reply:
        await reply.read()


def draw(scrapes: list[tuple[float, promql.Samples]], seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    rows = {p["gridPos"]["y"]: p["title"] for p in dashboard["panels"] if p["type"] == "row"}
    columns = 3
    lines = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(18, 3.3 * lines + 1.2), squeeze=False)
    for index, panel in enumerate(panels):
        ax = axes[index // columns][index % columns]
        row = max(y for y in rows if y < panel["gridPos"]["y"])
        ax.set_title(f"{rows[row]} · {panel['title']}", fontsize=9, loc="left")
        for target in panel["targets"]:
            series = promql.evaluate(promql.parse(target["expr"]), scrapes, RATE_WINDOW_S)
            for group, points in sorted(series.items()):
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, linewidth=1.2, label=_legend(target["legendFormat"], group))
        ax.set_xlim(0, seconds)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_ylabel(panel["fieldConfig"]["defaults"]["unit"], fontsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)
    for index in range(len(panels), lines * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle(
        f"imagegate dashboard (docs/grafana/imagegate.json), drawn with matplotlib from "
        f"{len(scrapes)} real /metrics scrapes every {SCRAPE_EVERY_S:g} s of a {seconds:g} s "
        "test run (bench/dashboard_picture.py): not a Grafana screenshot.\n"
        "x: seconds. Mixed traffic through the REST front to the local model and a fake "
        "upstream, which fails every call from 35% to 55% of the run.",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(PICTURE, dpi=80)


def _legend(template: str, group: tuple[tuple[str, str], ...]) -> str:
    values = dict(group)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values.get(m[1], ""), template) or "value"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    scrapes: list[tuple[float, promql.Samples]] = []
    asyncio.run(workload(args.seconds, scrapes))
    draw(scrapes, args.seconds)
    print(f"{PICTURE}: {len(scrapes)} scrapes")


if __name__ == "__main__":
    main()
