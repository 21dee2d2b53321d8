"""What one generation costs on its way through imagegate: sequential p50/p99 and CPU.

One run starts, each in its own process, a zero-latency OpenAI-wire fake upstream
(a fixed ~1 KB PNG whatever is asked), `imagegate serve` (SQLite billing, the catalog
routing model `fast` to the fake as `openai_compatible`) and optionally Envoy, then
sends sequential `b64_json` generations round-robin in small batches to (a) the fake
directly, (b) the aiohttp front, (c) gRPC to the service, (d) Envoy, so noise on the
shared machine lands on all of them alike. Reported: p50/p99 per target, the p50
overhead over (a), and the serve process's CPU ms per request of each target.

    .venv/bin/python bench/profile_path.py [--requests 2000] [--envoy]
        [--profile DIR]   # py-spy flame graphs (SVG) of serve under (b) and (c)
        [--env NAME=VALUE ...]   # IMAGEGATE_* settings for serve, e.g. IMAGEGATE_UVLOOP=false

This is a tool for profiling the single request path; `make bench` is the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import grpc
from aiohttp import web
from imagegate.v1 import images_pb2, images_pb2_grpc

from service import keys
from service.config import Config
from service.server import open_store

BIN = Path(sys.executable).parent
MODEL = "fast"
BODY = {"model": MODEL, "prompt": "bench", "size": "256x256", "response_format": "b64_json"}
TICK = os.sysconf("SC_CLK_TCK")


def _png() -> bytes:
    """A ~1 KB PNG: noise does not compress, so the size is what the pixels say."""
    from PIL import Image

    image = Image.frombytes("L", (30, 30), bytes((i * 7919) % 251 for i in range(900)))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def upstream(port: int) -> None:
    """The fake: one fixed reply, no checks, no logging."""
    reply = json.dumps(
        {"created": 1700000000, "data": [{"b64_json": base64.b64encode(_png()).decode()}]}
    ).encode()

    async def generate(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=reply, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/images/generations", generate)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _spawn(
    *argv: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    out = subprocess.DEVNULL if log is None else log.open("wb")
    return subprocess.Popen([a for part in argv for a in part], env=env, stdout=out, stderr=out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _catalog(path: Path, upstream_url: str) -> None:
    sizes = '["256x256", "512x512", "1024x1024"]'
    path.write_text(
        f"""[providers.fake]
kind = "openai_compatible"
base_url = "{upstream_url}/v1"
timeout_s = 5

[models.{MODEL}]
routes = [{{ provider = "fake", upstream_model = "fast-1" }}]
sizes = {sizes}
default_size = "256x256"
qualities = ["standard"]
default_quality = "standard"
n_max = 10
prices = {{ standard = {{ "256x256" = 100, "512x512" = 100, "1024x1024" = 100 }} }}
"""
    )


async def _new_key(data_dir: Path) -> str:
    store = open_store(Config(data_dir=data_dir))
    await store.open(migrate=True)
    try:
        await store.create_account("bench", 10**12)
        key = keys.new_key()
        await store.create_key("bench", keys.hash_key(key), "bench", "", None)
        return key
    finally:
        await store.close()


async def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


Call = Callable[[], Awaitable[None]]


async def _targets(
    key: str, upstream_url: str, rest_url: str, grpc_port: int, envoy_url: str | None
) -> tuple[dict[str, Call], list[object]]:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    body = json.dumps(BODY).encode()
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def post(url: str, headers: dict[str, str]) -> Call:
        async def call() -> None:
            async with session.post(url, data=body, headers=headers) as response:
                data = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: {response.status} {data[:300]!r}")

        return call

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = images_pb2_grpc.ImageServiceStub(channel)
    request = images_pb2.GenerateImagesRequest(
        model=MODEL, prompt="bench", size="256x256", response_format="b64_json"
    )
    metadata = (("authorization", f"Bearer {key}"),)

    async def grpc_call() -> None:
        await stub.GenerateImages(request, metadata=metadata, timeout=10)

    targets = {
        "a. upstream direct": post(f"{upstream_url}/v1/images/generations", {}),
        "b. aiohttp front": post(f"{rest_url}/v1/images/generations", auth),
        "c. gRPC direct": grpc_call,
    }
    if envoy_url:
        targets["d. Envoy front"] = post(f"{envoy_url}/v1/images/generations", auth)
    return targets, [session, channel]


async def _measure(
    targets: dict[str, Call], requests: int, serve_pid: int
) -> dict[str, tuple[list[float], float]]:
    samples: dict[str, list[float]] = {name: [] for name in targets}
    cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
    for call in targets.values():  # warm up connections, caches, the JIT of nothing
        for _ in range(50):
            await call()
    batch = 100
    for _ in range(max(1, requests // batch)):
        for name, call in targets.items():
            before = _cpu_s(serve_pid)
            for _ in range(batch):
                start = time.perf_counter()
                await call()
                samples[name].append(time.perf_counter() - start)
            cpu[name] += _cpu_s(serve_pid) - before
    return {name: (samples[name], cpu[name] / len(samples[name])) for name in targets}


def _report(results: dict[str, tuple[list[float], float]]) -> str:
    floor = statistics.median(results["a. upstream direct"][0])
    lines = [
        "| target | p50 ms | p99 ms | overhead p50 ms | serve CPU ms/req |",
        "|---|---|---|---|---|",
    ]
    for name, (samples, cpu) in results.items():
        ordered = sorted(samples)
        p50 = statistics.median(ordered)
        p99 = ordered[int(len(ordered) * 0.99) - 1]
        over = "" if name.startswith("a.") else f"{(p50 - floor) * 1000:.2f}"
        lines.append(
            f"| {name} | {p50 * 1000:.2f} | {p99 * 1000:.2f} | {over} | {cpu * 1000:.2f} |"
        )
    return "\n".join(lines)


async def _profile(
    out: Path, serve_pid: int, targets: dict[str, Call], label: str, seconds: int
) -> None:
    """py-spy flame graphs (and collapsed stacks) of serve while (b), then (c), run alone."""
    runs = [(n, f) for n in ("b. aiohttp front", "c. gRPC direct") for f in ("flamegraph", "raw")]
    for name, form in runs:
        short = "aiohttp" if name.startswith("b.") else "grpc"
        svg = out / f"{label}-{short}.{'svg' if form == 'flamegraph' else 'txt'}"
        spy = _spawn(
            [str(BIN / "py-spy"), "record", "--pid", str(serve_pid), "--rate", "500", "--gil"],
            ["--duration", str(seconds), "--format", form, "-o", str(svg)],
        )
        call = targets[name]
        while spy.poll() is None:
            await call()
        print(f"flame graph: {svg}", flush=True)


async def main(args: argparse.Namespace) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    envoy = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            up_port, grpc_port, rest_port = _free_port(), _free_port(), _free_port()
            procs.append(_spawn([sys.executable, __file__, "--upstream", str(up_port)]))
            await _wait_port(up_port, procs[0], "fake upstream")
            upstream_url = f"http://127.0.0.1:{up_port}"
            data = Path(tmp) / "data"
            catalog = Path(tmp) / "catalog.toml"
            _catalog(catalog, upstream_url)
            key = await _new_key(data)
            env = os.environ | {
                "IMAGEGATE_DATA_DIR": str(data),
                "IMAGEGATE_CATALOG": str(catalog),
                "IMAGEGATE_GRPC_PORT": str(grpc_port),
                "IMAGEGATE_REST_PORT": str(rest_port),
                "IMAGEGATE_METRICS_ADDRESS": "off",
            }
            env |= dict(pair.split("=", 1) for pair in args.env)
            serve = _spawn([str(BIN / "imagegate"), "serve"], env=env, log=Path(tmp) / "serve.log")
            procs.append(serve)
            await _wait_port(rest_port, serve, "imagegate serve")
            envoy_url = None
            if args.envoy:
                from tests.envoy_harness import EnvoyFront

                envoy = await EnvoyFront.start(grpc_port)
                envoy_url = envoy.base_url
            targets, closers = await _targets(
                key, upstream_url, f"http://127.0.0.1:{rest_port}", grpc_port, envoy_url
            )
            try:
                results = await _measure(targets, args.requests, serve.pid)
                print(_report(results), flush=True)
                if args.profile:
                    await _profile(Path(args.profile), serve.pid, targets, args.label, 15)
            finally:
                for closer in closers:
                    await closer.close()  # type: ignore[attr-defined]
        finally:
            if envoy is not None:
                await envoy.stop()
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--envoy", action="store_true")
    parser.add_argument("--profile", help="folder for py-spy flame graphs")
    parser.add_argument("--label", default="profile", help="flame graph file name prefix")
    parser.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for imagegate serve")
    args = parser.parse_args()
    if args.upstream:
        upstream(args.upstream)
    else:
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        asyncio.run(main(args))
