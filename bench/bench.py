"""`make bench`: what imagegate adds over a direct upstream call, against LiteLLM, in one run.

On 127.0.0.1, one zero-latency fake upstream (bench/fake_upstream.py) and, in
front of it, side by side under the same load:

  (a) fake      the fake called directly: the floor
  (b) aiohttp   imagegate's aiohttp front (`serve --workers N`, billing on SQLite)
  (b2) pinned   the same with `--pin-workers`: a second imagegate, each worker on a core
  (c) envoy     Envoy's gRPC-JSON transcoder in front of the same service workers
  (d) grpc      gRPC straight to the service workers
  (e) litellm   LiteLLM's proxy passing through to the same fake (bench/.venv)
  (f) skeleton  (b)'s processes and hops with none of imagegate's work (bench/skeleton.py):
                what the layout and its libraries cost alone

Figures: sequential latency and its overhead over (a); fixed offered rates with
p50/p99; the highest offered rate with p99 under 50 ms; closed-loop maximum;
a large payload (n=4, ~1.5 MB images, b64_json) in MB/s with peak RSS per
process; CPU milliseconds per request per process. Writes the JSON results,
docs/benchmarks.md and its chart (or --out DIR).

    python bench/bench.py            # about 5 minutes
    python bench/bench.py --quick    # a smoke test: seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadgen, report, stack
from bench.loadgen import Request, Run

TARGETS = ("fake", "aiohttp", "pinned", "envoy", "grpc", "litellm", "skeleton")
SLO_P99_MS = 50.0
# Offered rates go on past the SLO until the achieved rate falls below this share of
# the offered one, or p99 passes GIVE_UP_P99_MS.
SATURATED = 0.7
GIVE_UP_P99_MS = 1000.0
PROMPT = "a lighthouse at dusk"
# A lone request: one client at this rate, each request alone on an idle machine.
LONE_RPS = 20
# Large requests in flight at once (closed loop), per worker.
LARGE_PER_WORKER = 4


@dataclass(frozen=True)
class Timing:
    sequential_s: float
    step_s: float
    max_s: float
    large_s: float
    rates: tuple[int, ...]
    lone_s: float
    # Large requests each client sends with all in flight: a count, not a duration, so
    # that the CPU measured is that of the requests counted, every one answered.
    large_each: int


RATES = (100, 250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000)
FULL = Timing(3.0, 2.5, 3.0, 3.0, RATES, 3.0, 10)
QUICK = Timing(0.5, 0.5, 0.5, 1.0, (100, 500), 0.5, 2)


@dataclass
class Target:
    key: str
    label: str
    small: Request
    large: Request
    # Process groups whose CPU and memory are reported: name -> pids.
    groups: Callable[[], dict[str, list[int]]]
    # For gRPC, whose HTTP status is 200 whatever the call's outcome: the calls that
    # succeeded, read from the ledger (settled reservations).
    settled: Callable[[], int] | None = None
    # Longest event-loop stall per imagegate group over a wall-clock window.
    stalls: Callable[[float, float], dict[str, float]] | None = None
    # Large requests in flight at once.
    large_clients: int = 4


@dataclass
class Result:
    key: str
    label: str
    sequential: dict[str, float] = field(default_factory=dict)
    lone: dict[str, float] = field(default_factory=dict)
    steps: list[dict[str, float]] = field(default_factory=list)
    max_rps: float = 0.0
    slo_rate: int = 0
    large: dict[str, float] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    cpu_at_rate: float = 0.0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    # Large payload: CPU ms per request, (RSS added per request in flight) / response
    # size, and the longest event-loop stall in ms (one at a time; all in flight), per
    # process group.
    large_cpu_ms: dict[str, float] = field(default_factory=dict)
    memory_per_flight: dict[str, float] = field(default_factory=dict)
    stall_ms: dict[str, float] = field(default_factory=dict)
    stall_loaded_ms: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    note: str = ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: short runs, two rates")
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated, of {','.join(TARGETS)}"
    )
    parser.add_argument("--out", type=Path, help="where the report goes [docs/]")
    parser.add_argument("--workers", type=int, default=0, help="imagegate workers [one per core]")
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    timing = QUICK if args.quick else FULL
    out = args.out or stack.REPO / "docs"
    started = time.monotonic()
    results, machine = run(targets, timing, args.workers or len(os.sched_getaffinity(0)))
    machine["duration_s"] = round(time.monotonic() - started)
    machine["quick"] = args.quick
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(
        json.dumps({"machine": machine, "results": [asdict(r) for r in results]}, indent=1)
    )
    report.write(out, machine, results)
    print(report.table(machine, results))
    print(f"\nbench: report in {out / 'benchmarks.md'} ({machine['duration_s']} s)")
    return 0


def cpu_layout() -> tuple[str | None, str | None]:
    """(generator's cpus, servers' cpus) for taskset: the generator gets the last core;
    the servers the others when at least three remain, else they share every core."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    generator = str(cpus[-1])
    servers = ",".join(map(str, cpus[:-1])) if len(cpus) >= 4 else None
    return generator, servers


def pin(pids: list[int], cpus: str | None) -> None:
    """Every thread of `pids` onto `cpus` (threads made later inherit it)."""
    if cpus is None:
        return
    allowed = {int(c) for c in cpus.split(",")}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), allowed)


def run(targets: list[str], timing: Timing, workers: int) -> tuple[list[Result], dict[str, object]]:
    generator_cpus, server_cpus = cpu_layout()
    machine = report.machine()
    machine.update(workers=workers, generator_cpus=generator_cpus, server_cpus=server_cpus,
                   lone_rps=LONE_RPS, large_per_worker=LARGE_PER_WORKER)  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="imagegate-bench-") as tmp,
        contextlib.ExitStack() as ex,
    ):
        work = Path(tmp)
        fake, fake_port = stack.start_fake(work)
        ex.callback(fake.stop)
        pin([fake.pid], server_cpus)
        bodies = _bodies(work)
        fake_url = f"http://127.0.0.1:{fake_port}"
        machine["ceiling"] = ceiling(fake_url, generator_cpus, timing)
        json_h = ("content-type: application/json",)

        def fake_group(group: contextlib.ExitStack, wanted: list[str]) -> dict[str, Target]:
            return {
                "fake": Target(
                    "fake", "(a) fake upstream, direct",
                    Request(f"{fake_url}/v1/images/generations", json_h, bodies["fake"]),
                    Request(f"{fake_url}/v1/images/generations", json_h, bodies["fake_large"]),
                    lambda: {"fake": [fake.pid]},
                )
            }  # fmt: skip

        def gate_group(group: contextlib.ExitStack, wanted: list[str]) -> dict[str, Target]:
            gate = stack.start_imagegate(work, fake_port, workers)
            group.callback(gate.proc.stop)
            pin(stack.descendants(gate.proc.pid), server_cpus)
            auth = f"authorization: Bearer {gate.key}"
            rest_h = (*json_h, auth)
            offered = {}
            offered["aiohttp"] = Target(
                "aiohttp", f"(b) imagegate, aiohttp front ({workers} workers)",
                Request(f"{gate.rest_url}/v1/images/generations", rest_h, bodies["rest"]),
                Request(f"{gate.rest_url}/v1/images/generations", rest_h, bodies["rest_large"]),
                lambda: {"front": gate.fronts, "service": gate.services, "fake": [fake.pid]},
                stalls=lambda start, end: stack.longest_stalls(
                    work, {"front": gate.fronts, "service": gate.services}, start, end),
            )  # fmt: skip
            grpc_url = f"http://127.0.0.1:{gate.grpc_port}/imagegate.v1.ImageService/GenerateImages"
            grpc_h = ("content-type: application/grpc", "te: trailers", auth)
            offered["grpc"] = Target(
                "grpc", f"(d) imagegate, gRPC direct ({workers} workers)",
                Request(grpc_url, grpc_h, bodies["grpc"], h1=False),
                Request(grpc_url, grpc_h, bodies["grpc_large"], h1=False),
                lambda: {"service": gate.services, "fake": [fake.pid]},
                settled=lambda: stack.settled_count(gate.data_dir),
                stalls=lambda start, end: stack.longest_stalls(
                    work, {"service": gate.services}, start, end),
            )  # fmt: skip
            if "envoy" in wanted:
                base, envoy_pid = group.enter_context(stack.envoy(gate, concurrency=workers))
                pin([envoy_pid], server_cpus)
                offered["envoy"] = Target(
                    "envoy", f"(c) imagegate, Envoy front ({workers} workers)",
                    Request(f"{base}/v1/images/generations", rest_h, bodies["rest"]),
                    Request(f"{base}/v1/images/generations", rest_h, bodies["rest_large"]),
                    lambda: {"envoy": [envoy_pid], "service": gate.services, "fake": [fake.pid]},
                    stalls=lambda start, end: stack.longest_stalls(
                        work, {"service": gate.services}, start, end),
                )  # fmt: skip
            return offered

        def pinned_group(group: contextlib.ExitStack, wanted: list[str]) -> dict[str, Target]:
            # A second imagegate, `--pin-workers`: started on the servers' cores (taskset)
            # rather than pinned afterwards, which would undo each worker's own core.
            pinned = stack.start_imagegate(
                work / "pinned", fake_port, workers, "--pin-workers", cpus=server_cpus
            )
            group.callback(pinned.proc.stop)
            pinned_h = (*json_h, f"authorization: Bearer {pinned.key}")
            return {
                "pinned": Target(
                    "pinned", f"(b2) imagegate, aiohttp front, --pin-workers ({workers} workers)",
                    Request(f"{pinned.rest_url}/v1/images/generations", pinned_h, bodies["rest"]),
                    Request(f"{pinned.rest_url}/v1/images/generations", pinned_h,
                            bodies["rest_large"]),
                    lambda: {"front": pinned.fronts, "service": pinned.services,
                             "fake": [fake.pid]},
                    stalls=lambda start, end: stack.longest_stalls(
                        work / "pinned", {"front": pinned.fronts, "service": pinned.services},
                        start, end),
                )
            }  # fmt: skip

        def litellm_group(group: contextlib.ExitStack, wanted: list[str]) -> dict[str, Target]:
            try:
                litellm, litellm_url = stack.start_litellm(work, fake_port, workers)
            except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
                # No registry, or it would not start: the others are still worth a report.
                print(f"bench: LiteLLM not measured: {exc}", file=sys.stderr, flush=True)
                machine["skipped"] = f"LiteLLM: {str(exc).splitlines()[0]}"
                return {}
            group.callback(litellm.stop)
            pin(stack.descendants(litellm.pid), server_cpus)
            lite_h = (*json_h, f"authorization: Bearer {stack.LITELLM_KEY}")
            return {
                "litellm": Target(
                    "litellm", f"(e) LiteLLM {stack.litellm_version()} proxy ({workers} workers)",
                    Request(f"{litellm_url}/v1/images/generations", lite_h, bodies["rest"]),
                    Request(f"{litellm_url}/v1/images/generations", lite_h, bodies["rest_large"]),
                    lambda: {"litellm": stack.descendants(litellm.pid), "fake": [fake.pid]},
                )
            }  # fmt: skip

        def skeleton_group(group: contextlib.ExitStack, wanted: list[str]) -> dict[str, Target]:
            skeleton = stack.start_skeleton(work, fake_port, workers)
            group.callback(skeleton.proc.stop)
            pin(stack.descendants(skeleton.proc.pid), server_cpus)
            url = f"{skeleton.rest_url}/v1/images/generations"
            return {
                "skeleton": Target(
                    "skeleton",
                    f"(f) skeleton: (b)'s processes without imagegate's work ({workers} workers)",
                    Request(url, json_h, bodies["rest"]),
                    Request(url, json_h, bodies["rest_large"]),
                    lambda: {"front": skeleton.fronts, "service": skeleton.services,
                             "fake": [fake.pid]},
                )
            }  # fmt: skip

        # Each group's servers run only while its targets are measured: an idle server
        # still wakes (timers, health checks, background tasks), and on 2 cores such
        # wake-ups showed in the other targets' figures (docs/benchmarks.md).
        groups = (
            (("fake",), fake_group),
            (("aiohttp", "envoy", "grpc"), gate_group),
            (("pinned",), pinned_group),
            (("litellm",), litellm_group),
            (("skeleton",), skeleton_group),
        )
        results = []
        for keys, start_group in groups:
            wanted = [k for k in keys if k in targets]
            if not wanted:
                continue
            with contextlib.ExitStack() as group:
                offered = start_group(group, wanted)
                for key in wanted:
                    if key in offered:
                        offered[key].large_clients = LARGE_PER_WORKER * workers
                        print(f"bench: {offered[key].label} ...", flush=True)
                        results.append(measure(offered[key], timing, generator_cpus))
        results.sort(key=lambda r: TARGETS.index(r.key))
    return results, machine


def _bodies(work: Path) -> dict[str, Path]:
    from imagegate.v1 import images_pb2

    def rest(model: str, size: str = stack.SMALL_SIZE, n: int = 1) -> bytes:
        body = {"model": model, "prompt": PROMPT, "size": size, "n": n,
                "response_format": "b64_json"}  # fmt: skip
        return json.dumps(body).encode()

    def grpc(model: str, size: str = stack.SMALL_SIZE, n: int = 1) -> bytes:
        message: bytes = images_pb2.GenerateImagesRequest(
            model=model, prompt=PROMPT, size=size, n=n, response_format="b64_json"
        ).SerializeToString()
        return struct.pack(">BI", 0, len(message)) + message

    contents = {
        "fake": rest("bench-upstream"),
        "fake_large": rest("bench-upstream", stack.LARGE_SIZE, 4),
        "rest": rest(stack.BENCH_MODEL),
        "rest_large": rest(stack.BENCH_MODEL, stack.LARGE_SIZE, 4),
        "grpc": grpc(stack.BENCH_MODEL),
        "grpc_large": grpc(stack.BENCH_MODEL, stack.LARGE_SIZE, 4),
    }
    paths = {}
    for name, content in contents.items():
        paths[name] = work / f"{name}.body"
        paths[name].write_bytes(content)
    return paths


def ceiling(fake_url: str, cpus: str | None, timing: Timing) -> dict[str, float]:
    """The generators against a bare aiohttp handler: what they can measure at most."""
    ping = Request(f"{fake_url}/ping", (), None)
    seconds = timing.max_s
    return {
        "wrk_rps": loadgen.wrk(ping, connections=32, seconds=seconds, cpus=cpus),
        "h2load_rps": loadgen.h2load(ping, clients=32, seconds=seconds, cpus=cpus).rps,
    }


def measure(target: Target, timing: Timing, cpus: str | None) -> Result:
    result = Result(target.key, target.label)

    def load(
        request: Request,
        clients: int,
        seconds: float,
        rps_per_client: float | None = None,
        count: int | None = None,
    ) -> Run:
        before = target.settled() if target.settled else 0
        # h2c: a few calls in flight per connection at fixed rates, as a gRPC client has.
        streams = 4 if not request.h1 and rps_per_client is not None else 1
        run = loadgen.h2load(
            request, clients=clients, seconds=seconds, rps_per_client=rps_per_client,
            streams=streams, cpus=cpus, count=count,
        )  # fmt: skip
        if target.settled is not None:
            settled = target.settled() - before
            run = Run(run.requests, min(run.succeeded, settled), run.seconds,
                      run.bytes_per_s, run.p50_ms, run.p99_ms)  # fmt: skip
        result.errors += run.failed
        return run

    # Warm-up: every worker's first requests (LiteLLM's first takes seconds).
    load(target.small, clients=8, seconds=60, count=80)
    result.errors = 0
    seq = load(target.small, clients=1, seconds=timing.sequential_s)
    result.sequential = {"p50_ms": seq.p50_ms, "p99_ms": seq.p99_ms, "rps": seq.rps}
    lone = load(target.small, clients=1, seconds=timing.lone_s, rps_per_client=LONE_RPS)
    result.lone = {"p50_ms": lone.p50_ms, "p99_ms": lone.p99_ms}
    within_slo = True
    for rate in timing.rates:
        clients = max(2, min(200, rate // 20))
        with cpu_meter(target.groups()) as cpu:
            run = load(target.small, clients=clients, seconds=timing.step_s,
                       rps_per_client=rate / clients)  # fmt: skip
        step = {"rate": rate, "rps": run.rps, "p50_ms": run.p50_ms, "p99_ms": run.p99_ms,
                "failed": run.failed}  # fmt: skip
        result.steps.append(step)
        if rate <= 500 or not result.cpu_ms:
            result.cpu_ms = {g: ms / max(run.succeeded, 1) for g, ms in cpu.items()}
            result.cpu_at_rate = rate
        kept_up = run.rps >= 0.9 * rate and run.failed <= 0.01 * max(run.requests, 1)
        if kept_up and run.p99_ms < SLO_P99_MS and within_slo:
            result.slo_rate = rate
        else:
            within_slo = False
        # Past the SLO too, for the chart's knee; not once the target is overwhelmed.
        if run.rps < SATURATED * rate or run.p99_ms > GIVE_UP_P99_MS:
            break
    closed = load(target.small, clients=32, seconds=timing.max_s)
    result.max_rps = closed.rps
    measure_large(target, timing, result, load)
    print(f"  sequential p50 {seq.p50_ms:.2f} ms, SLO rate {result.slo_rate}, "
          f"max {result.max_rps:.0f} req/s, large {result.large['mb_per_s']:.0f} MB/s, "
          f"errors {result.errors}", flush=True)  # fmt: skip
    return result


def measure_large(target: Target, timing: Timing, result: Result, load: Callable[..., Run]) -> None:
    """n=4 large images: one at a time for the latency and the loop's longest stall, then
    `large_clients` in flight (closed loop) for MB/s, CPU, the memory each adds and the
    longest stall again (then with the cores oversubscribed, a wait for a core counts)."""
    time.sleep(1)  # the stall watch's one-second lines start afresh
    one_start = time.time()
    one = load(target.large, clients=1, seconds=timing.large_s)
    one_end = time.time()
    groups = target.groups()
    time.sleep(1)  # at rest; and the stall watch's lines start afresh again
    reset_peak_rss(groups)
    rest = rss_kb(groups)
    start, busy_before = time.time(), machine_busy_s()
    with cpu_meter(groups) as cpu:
        large = load(target.large, clients=target.large_clients, seconds=60,
                     count=target.large_clients * timing.large_each)  # fmt: skip
    end, busy_after = time.time(), machine_busy_s()
    peaks = hwm_kb(groups)
    response_bytes = large.bytes_per_s / large.rps if large.rps else 0.0
    result.large = {"mb_per_s": large.bytes_per_s / 1e6, "rps": large.rps,
                    "p50_ms": large.p50_ms, "p99_ms": large.p99_ms,
                    "one_p50_ms": one.p50_ms, "in_flight": target.large_clients,
                    "response_mb": response_bytes / 1e6,
                    "machine_cores_busy": (busy_after - busy_before) / (end - start)}  # fmt: skip
    result.large_cpu_ms = {g: ms / max(large.succeeded, 1) for g, ms in cpu.items()}
    result.peak_rss_mb = {g: max(kb.values()) / 1024 for g, kb in peaks.items() if kb}
    if response_bytes:
        # Summed over the group's processes: however the kernel spread the connections.
        result.memory_per_flight = {
            g: sum(max(0, kb - rest[g].get(pid, kb)) for pid, kb in peaks[g].items())
            * 1024
            / target.large_clients
            / response_bytes
            for g in groups
        }
    if target.stalls is not None:
        result.stall_ms = target.stalls(one_start, one_end)
        result.stall_loaded_ms = target.stalls(start, end)


TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used (all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) * TICK_MS / 1000


def cpu_ms(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * TICK_MS
    return 0.0


@contextlib.contextmanager
def cpu_meter(groups: dict[str, list[int]]) -> Iterator[dict[str, float]]:
    """CPU milliseconds each group spent while the block ran."""
    before = {g: sum(cpu_ms(p) for p in pids) for g, pids in groups.items()}
    used: dict[str, float] = {}
    yield used
    for g, pids in groups.items():
        used[g] = sum(cpu_ms(p) for p in pids) - before[g]


def reset_peak_rss(groups: dict[str, list[int]]) -> None:
    for pids in groups.values():
        for pid in pids:
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")


def _status_kb(groups: dict[str, list[int]], field: str) -> dict[str, dict[int, int]]:
    """`field` of /proc/PID/status (kB) for each process of each group."""
    values: dict[str, dict[int, int]] = {}
    for g, pids in groups.items():
        values[g] = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(f"{field}:"):
                        values[g][pid] = int(line.split()[1])
    return values


def rss_kb(groups: dict[str, list[int]]) -> dict[str, dict[int, int]]:
    return _status_kb(groups, "VmRSS")


def hwm_kb(groups: dict[str, list[int]]) -> dict[str, dict[int, int]]:
    """Peak RSS since the last reset_peak_rss()."""
    return _status_kb(groups, "VmHWM")


if __name__ == "__main__":
    sys.exit(main())
