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
        [--compare NAME=VALUE ...]  # a second serve with these, (b) and (c) interleaved;
                                    # BENCH_SERVE_BIN=PATH: that `imagegate` (another venv)
        [--wrk SECONDS]   # then wrk req/s through each aiohttp front (one worker: on core 0)
        [--envoy-b CONFIG]  # a second Envoy from CONFIG beside the committed one
        [--skeleton]      # and bench/skeleton.py (the layout without imagegate's work),
                          # as many workers as serve: compare them at --workers 2;
                          # with --envoy, an Envoy in front of its services too
    .venv/bin/python bench/profile_path.py --grpc-client   # CPU per call of gRPC clients

This is a tool for profiling the single request path; `make bench` is the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import grpc
from aiohttp import web
from imagegate.v1 import images_pb2, images_pb2_grpc

from bench import stack
from service import keys
from service.config import Config
from service.server import open_store

BIN = Path(sys.executable).parent
MODEL = "fast"
BODY = {"model": MODEL, "prompt": "bench", "size": "256x256", "response_format": "b64_json"}
TICK = os.sysconf("SC_CLK_TCK")
WORKERS = 1  # --workers
ENVOY_CONCURRENCY = 1  # --envoy-concurrency


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


async def _new_key(data_dir: Path, key: str) -> None:
    store = open_store(Config(data_dir=data_dir))
    await store.open(migrate=True)
    try:
        await store.create_account("bench", 10**12)
        await store.create_key("bench", keys.hash_key(key), "bench", "", None)
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
    """User + system seconds of pid and its live descendants (serve --workers N)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / TICK
    return own + sum(_cpu_s(int(child)) for child in children)


Call = Callable[[], Awaitable[None]]
# A target: what to call, and the pid whose CPU it is charged to (0: none of ours).
Target = tuple[Call, int]


class Client:
    """One keep-alive HTTP connection per URL and one gRPC channel per service."""

    def __init__(self, key: str) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.channels: list[grpc.aio.Channel] = []
        self.body = json.dumps(BODY).encode()
        self.auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.metadata = (("authorization", f"Bearer {key}"),)

    def post(self, url: str, *, auth: bool = True) -> Call:
        headers = self.auth if auth else {}
        url = f"{url}/v1/images/generations"

        async def call() -> None:
            async with self.session.post(url, data=self.body, headers=headers) as response:
                data = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: {response.status} {data[:300]!r}")

        return call

    def grpc(self, port: int) -> Call:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        stub = images_pb2_grpc.ImageServiceStub(channel)
        request = images_pb2.GenerateImagesRequest(
            model=MODEL, prompt="bench", size="256x256", response_format="b64_json"
        )

        async def call() -> None:
            await stub.GenerateImages(request, metadata=self.metadata, timeout=10)

        return call

    async def close(self) -> None:
        await self.session.close()
        for channel in self.channels:
            await channel.close()


async def _measure(
    targets: dict[str, Target], requests: int, envoy_pids: dict[str, int]
) -> dict[str, tuple[list[float], float, float]]:
    """Per target: the latencies, serve's CPU per request, Envoy's CPU per request."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
    envoy_cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
    for call, _ in targets.values():  # warm up connections and caches
        for _ in range(50):
            await call()
    batch = 100
    for _ in range(max(1, requests // batch)):
        for name, (call, pid) in targets.items():
            envoy = envoy_pids.get(name, 0)
            before = _cpu_s(pid) if pid else 0.0
            envoy_before = _cpu_s(envoy) if envoy else 0.0
            for _ in range(batch):
                start = time.perf_counter()
                await call()
                samples[name].append(time.perf_counter() - start)
            cpu[name] += (_cpu_s(pid) if pid else 0.0) - before
            envoy_cpu[name] += (_cpu_s(envoy) if envoy else 0.0) - envoy_before
    return {
        name: (samples[name], cpu[name] / len(samples[name]), envoy_cpu[name] / len(samples[name]))
        for name in targets
    }


def _report(results: dict[str, tuple[list[float], float, float]]) -> str:
    floor = statistics.median(results["a. upstream direct"][0])
    lines = [
        "| target | p50 ms | p99 ms | overhead p50 ms | server CPU ms/req | Envoy CPU ms/req |",
        "|---|---|---|---|---|---|",
    ]
    for name, (samples, cpu, envoy_cpu) in results.items():
        ordered = sorted(samples)
        p50 = statistics.median(ordered)
        p99 = ordered[int(len(ordered) * 0.99) - 1]
        over = "" if name.startswith("a.") else f"{(p50 - floor) * 1000:.2f}"
        envoy = f"{envoy_cpu * 1000:.2f}" if envoy_cpu else ""
        figures = f"{p50 * 1000:.2f} | {p99 * 1000:.2f} | {over} | {cpu * 1000:.2f} | {envoy}"
        lines.append(f"| {name} | {figures} |")
    return "\n".join(lines)


async def _profile(
    out: Path, serve_pid: int, targets: dict[str, Target], label: str, seconds: int
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
        call = targets[name][0]
        while spy.poll() is None:
            await call()
        print(f"flame graph: {svg}", flush=True)


_WRK_POST = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


async def _throughput(
    tmp: Path, key: str, fronts: dict[str, tuple[int, int, bool]], seconds: int
) -> None:
    """wrk (16 connections) on core 1: req/s of each aiohttp front (label: port, pid, whether
    it serves GET /v1/models). With one worker, the front's processes are pinned to core 0."""
    post = tmp / "post.lua"
    post.write_text(_WRK_POST % (json.dumps(BODY), key))
    where = "one worker on core 0" if WORKERS == 1 else f"{WORKERS} workers, unpinned"
    print(f"| aiohttp front, {where} | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|", flush=True)
    for label, (port, pid, models) in fronts.items():
        if WORKERS == 1:
            _pin(pid, "0")
        url = f"http://127.0.0.1:{port}"
        cases = {"POST generations": ["-s", str(post), f"{url}/v1/images/generations"]}
        if models:
            cases["GET /v1/models"] = ["-H", f"Authorization: Bearer {key}", f"{url}/v1/models"]
        for case, argv in cases.items():
            out = await asyncio.to_thread(
                _run,
                ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", *argv],
            )
            rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
            p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
            p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
            per_s = float(rate[1]) if rate else 0.0
            print(f"| {case}{label} | {per_s:,.0f} | {_ms(p50)} | {_ms(p99)} |", flush=True)
        if WORKERS == 1:
            _pin(pid, "0,1")


def _pin(pid: int, cores: str) -> None:
    """pid and its descendants, every thread, to these cores."""
    for process in stack.descendants(pid):
        _run(["taskset", "-a", "-p", "-c", cores, str(process)])


def _ms(match: re.Match[str] | None) -> str:
    if match is None:
        return "?"
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match[2]]
    return f"{float(match[1]) * scale:.2f}"


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


async def _serve(
    tmp: Path, name: str, catalog: Path, key: str, extra: list[str]
) -> tuple[subprocess.Popen[bytes], int, int]:
    """`imagegate serve` on its own database (holding `key`): (process, gRPC port, REST port)."""
    data = tmp / name
    await _new_key(data, key)
    grpc_port, rest_port = _free_port(), _free_port()
    env = os.environ | {
        "IMAGEGATE_DATA_DIR": str(data),
        "IMAGEGATE_CATALOG": str(catalog),
        "IMAGEGATE_GRPC_PORT": str(grpc_port),
        "IMAGEGATE_REST_PORT": str(rest_port),
        "IMAGEGATE_METRICS_ADDRESS": "off",
        # One process by default: the front and the service.
        "IMAGEGATE_WORKERS": str(WORKERS),
    }
    env |= dict(pair.split("=", 1) for pair in extra)
    binary = env.pop("BENCH_SERVE_BIN", str(BIN / "imagegate"))
    serve = _spawn([binary, "serve"], env=env, log=tmp / f"{name}.log")
    await _wait_port(rest_port, serve, "imagegate serve")
    return serve, grpc_port, rest_port


async def main(args: argparse.Namespace) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    envoy = envoy2 = envoy_b = envoy_bare = None
    envoy_pids: dict[str, int] = {}
    key = keys.new_key()
    client = Client(key)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        try:
            up_port = _free_port()
            procs.append(_spawn([sys.executable, __file__, "--upstream", str(up_port)]))
            await _wait_port(up_port, procs[0], "fake upstream")
            upstream_url = f"http://127.0.0.1:{up_port}"
            catalog = tmp / "catalog.toml"
            _catalog(catalog, upstream_url)
            serve, grpc_port, rest_port = await _serve(tmp, "a", catalog, key, args.env)
            procs.append(serve)
            targets: dict[str, Target] = {
                "a. upstream direct": (client.post(upstream_url, auth=False), 0),
                "b. aiohttp front": (client.post(f"http://127.0.0.1:{rest_port}"), serve.pid),
                "c. gRPC direct": (client.grpc(grpc_port), serve.pid),
            }
            if args.envoy:
                from tests.envoy_harness import EnvoyFront

                envoy = await EnvoyFront.start(grpc_port, concurrency=ENVOY_CONCURRENCY)
                targets["d. Envoy front"] = (client.post(envoy.base_url), serve.pid)
                envoy_pids["d. Envoy front"] = envoy.pid
            if args.envoy_b:
                from tests.envoy_harness import EnvoyFront

                # Another Envoy config in front of the same serve, interleaved.
                envoy_b = await EnvoyFront.start(
                    grpc_port, source=Path(args.envoy_b), concurrency=ENVOY_CONCURRENCY
                )
                name = f"d. Envoy front, {Path(args.envoy_b).name}"
                targets[name] = (client.post(envoy_b.base_url), serve.pid)
                envoy_pids[name] = envoy_b.pid
            if args.skeleton:
                bare = await asyncio.to_thread(stack.start_skeleton, tmp, up_port, WORKERS)
                procs.append(bare.proc.popen)
                targets["f. skeleton, aiohttp front"] = (client.post(bare.rest_url), bare.proc.pid)
                targets["g. skeleton, gRPC direct"] = (client.grpc(bare.grpc_port), bare.proc.pid)
                if args.envoy:
                    from tests.envoy_harness import EnvoyFront

                    envoy_bare = await EnvoyFront.start(
                        bare.grpc_port, concurrency=ENVOY_CONCURRENCY
                    )
                    name = "h. skeleton, Envoy front"
                    targets[name] = (client.post(envoy_bare.base_url), bare.proc.pid)
                    envoy_pids[name] = envoy_bare.pid
            if args.compare:
                # The same, on a second serve with other settings, interleaved with the first.
                other, grpc2, rest2 = await _serve(tmp, "b", catalog, key, args.compare)
                procs.append(other)
                with_ = " ".join(args.compare)
                targets[f"b. aiohttp front, {with_}"] = (
                    client.post(f"http://127.0.0.1:{rest2}"),
                    other.pid,
                )
                targets[f"c. gRPC direct, {with_}"] = (client.grpc(grpc2), other.pid)
                if args.envoy:
                    from tests.envoy_harness import EnvoyFront

                    envoy2 = await EnvoyFront.start(grpc2, concurrency=ENVOY_CONCURRENCY)
                    targets[f"d. Envoy front, {with_}"] = (client.post(envoy2.base_url), other.pid)
                    envoy_pids[f"d. Envoy front, {with_}"] = envoy2.pid
            results = await _measure(targets, args.requests, envoy_pids)
            print(_report(results), flush=True)
            if args.wrk:
                rest = {"": (rest_port, serve.pid, True)}
                if args.compare:
                    rest[", " + " ".join(args.compare)] = (rest2, other.pid, True)
                if args.skeleton:
                    rest[", skeleton"] = (bare.rest_port, bare.proc.pid, False)
                await _throughput(tmp, key, rest, args.wrk)
            if args.profile:
                await _profile(Path(args.profile), serve.pid, targets, args.label, 15)
        finally:
            await client.close()
            for front in (envoy, envoy2, envoy_b, envoy_bare):
                if front is not None:
                    await front.stop()
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(10)


def health_server(port: int) -> None:
    """A grpc.aio server whose Health.Check answers at once (for --grpc-client)."""
    import uvloop
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    class Health(health_pb2_grpc.HealthServicer):
        async def Check(self, request: Any, context: Any) -> Any:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def serve() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.add_insecure_port(f"unix:/tmp/imagegate-profile-{port}.sock")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(serve())


async def client_variants(port: int, server_pid: int, calls: int) -> None:
    """CPU (client's, server's) and wall time per unary call of each way the front could
    call the service."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    request = health_pb2.HealthCheckRequest()
    # What the front sends: the key, a request id, the forwarded host and scheme.
    metadata = (
        ("authorization", "Bearer sk-" + "a" * 43),
        ("x-request-id", "req_0123456789abcdef0123"),
        ("x-forwarded-host", "127.0.0.1:8080"),
        ("x-forwarded-proto", "http"),
    )
    loop = asyncio.get_running_loop()
    tcp, uds = f"127.0.0.1:{port}", f"unix:/tmp/imagegate-profile-{port}.sock"

    def aio(target: str, options: list[tuple[str, Any]], **kw: Any) -> Call:
        stub = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(target, options=options))

        async def call() -> None:
            await stub.Check(request, **kw)

        return call

    sync = health_pb2_grpc.HealthStub(grpc.insecure_channel(tcp))

    async def in_thread() -> None:
        await loop.run_in_executor(None, partial(sync.Check, request, metadata=metadata))

    async def with_future() -> None:
        done: asyncio.Future[Any] = loop.create_future()
        call = sync.Check.future(request, metadata=metadata)
        call.add_done_callback(lambda f: loop.call_soon_threadsafe(done.set_result, f.result()))
        await done

    limits = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    variants: dict[str, Call] = {
        "grpc.aio, no metadata, no deadline": aio(tcp, []),
        "grpc.aio as the front calls (4 metadata, deadline, size limits)": aio(
            tcp, limits, metadata=metadata, timeout=300.0
        ),
        "  + retries off": aio(
            tcp, [*limits, ("grpc.enable_retries", 0)], metadata=metadata, timeout=300.0
        ),
        "  + minimal stack": aio(
            tcp, [*limits, ("grpc.minimal_stack", 1)], metadata=metadata, timeout=300.0
        ),
        "  over a Unix socket": aio(uds, limits, metadata=metadata, timeout=300.0),
        "sync stub in a thread (run_in_executor)": in_thread,
        "sync stub .future() + call_soon_threadsafe": with_future,
    }
    for name, call in variants.items():
        for _ in range(200):
            await call()
        cpu, served, wall = time.process_time(), _cpu_s(server_pid), time.perf_counter()
        for _ in range(calls):
            await call()
        cpu_ms = (time.process_time() - cpu) / calls * 1000
        server_ms = (_cpu_s(server_pid) - served) / calls * 1000
        wall_ms = (time.perf_counter() - wall) / calls * 1000
        print(f"| {name} | {cpu_ms:.3f} | {server_ms:.3f} | {wall_ms:.3f} |", flush=True)


async def grpc_client(calls: int) -> None:
    port = _free_port()
    server = _spawn([sys.executable, __file__, "--health-server", str(port)])
    try:
        await _wait_port(port, server, "health server")
        print(
            "| client | CPU ms/call | server CPU ms/call | wall ms/call |\n|---|---|---|---|",
            flush=True,
        )
        await client_variants(port, server.pid, calls)
    finally:
        server.terminate()
        server.wait(10)
        _remove(f"/tmp/imagegate-profile-{port}.sock")


def _remove(path: str) -> None:
    Path(path).unlink(missing_ok=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--health-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--grpc-client", action="store_true", help="CPU per call of grpc client variants"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--envoy", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="imagegate serve --workers")
    parser.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy --concurrency")
    parser.add_argument("--envoy-b", help="a second Envoy from this config, beside --envoy's")
    parser.add_argument(
        "--skeleton", action="store_true", help="and bench/skeleton.py: the layout, no work"
    )
    parser.add_argument("--wrk", type=int, default=0, help="seconds of wrk per case (0: none)")
    parser.add_argument("--profile", help="folder for py-spy flame graphs")
    parser.add_argument("--label", default="profile", help="flame graph file name prefix")
    parser.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for imagegate serve")
    parser.add_argument(
        "--compare", nargs="*", default=[], help="NAME=VALUE for a second serve measured beside"
    )
    args = parser.parse_args()
    WORKERS, ENVOY_CONCURRENCY = args.workers, args.envoy_concurrency
    if args.upstream:
        upstream(args.upstream)
    elif args.health_server:
        health_server(args.health_server)
    elif args.grpc_client:
        import uvloop

        uvloop.run(grpc_client(args.requests))
    else:
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        asyncio.run(main(args))
