"""The admin listener: Prometheus `/metrics` on its own address, never on the public port.

One listener per process tree: `serve` serves the service's and the front's
metrics together (one process, one registry); `serve-rest` and `serve-grpc`
each have their own; under `serve --workers N` the supervisor serves every
worker's from PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("imagegate.admin")
Refresh = Callable[[], Awaitable[None]]
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OFF = ("", "off", "none")


def parse_address(address: str) -> tuple[str, int] | None:
    """'HOST:PORT' ('[::1]:9464' for IPv6) -> (host, port); None for 'off'."""
    if address.strip().lower() in OFF:
        return None
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"metrics address {address!r}: use HOST:PORT, e.g. 127.0.0.1:9464, or off")
    return host.removeprefix("[").removesuffix("]"), int(port)


def registry() -> CollectorRegistry:
    """This process's metrics, or every process's of the multiprocess directory."""
    if os.environ.get(MULTIPROC_ENV):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return REGISTRY


@contextlib.contextmanager
def multiprocess_metrics() -> Iterator[Path]:
    """For a supervisor about to spawn its workers: a fresh private directory as
    PROMETHEUS_MULTIPROC_DIR, which the workers inherit (prometheus-client chooses
    where values live when it is imported, so it must be set before they start).
    The supervisor's own listener then serves every worker's metrics; a worker that
    ends is forgotten with metrics.mark_dead(pid). Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="imagegate-metrics-"))  # 0700: private
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def create_app(refresh: Refresh | None = None) -> web.Application:
    source = registry()

    async def metrics(request: web.Request) -> web.Response:
        if refresh is not None:
            try:
                await refresh()
            except Exception:
                # The counters are still worth a scrape; the gauges keep their last values.
                log.warning("metrics: refreshing the store's gauges failed", exc_info=True)
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        # Rendering every series is CPU work (and file reads in multiprocess mode).
        body = await asyncio.to_thread(encode, source)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def start_admin(address: str, refresh: Refresh | None = None) -> web.AppRunner | None:
    """Serve /metrics on `address` (HOST:PORT; port 0 picks one); None when it is off."""
    parsed = parse_address(address)
    if parsed is None:
        return None
    host, port = parsed
    runner = web.AppRunner(create_app(refresh), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        # Say which listener: the public ports are reported the same way.
        raise OSError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    except BaseException:
        await runner.cleanup()
        raise
    log.info("metrics on http://%s/metrics", admin_url(runner).removeprefix("http://"))
    return runner


def admin_url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
