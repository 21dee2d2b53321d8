"""The load generators: h2load (nghttp2-client) for every figure with latencies, HTTP/1.1
and gRPC alike, and wrk for the generator's ceiling. Both are compiled, run in their
own process, and are pinned to their own core when `cpus` says which.

h2load writes one line per request (start, status, microseconds) with --log-file,
from which the percentiles are read.

A fixed offered rate is `clients x --rps`, the clients' start times spread evenly over
one client's period (`-r`/`--rate-period`), so that their sends interleave into one
evenly spaced stream instead of arriving together in bursts. Latencies count from when
h2load sent each request; an answer slower than its client's send interval also
counts the sends it held up (see _latencies()), so that coordinated omission does not
hide a backlog.
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

WRK_POST = """wrk.method = "POST"
wrk.body = io.open("{body}", "rb"):read()
{headers}
"""


@dataclass(frozen=True)
class Request:
    """One kind of request: where, with which headers and body, over which protocol."""

    url: str
    headers: tuple[str, ...]
    body: Path | None
    # HTTP/1.1 for the REST fronts; h2c (prior knowledge) for gRPC.
    h1: bool = True


@dataclass(frozen=True)
class Run:
    requests: int
    succeeded: int
    seconds: float
    # Response bytes per second (headers and bodies).
    bytes_per_s: float
    # Milliseconds; at a fixed rate with the held-up sends counted (see _latencies()).
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.succeeded / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        return self.requests - self.succeeded


def _taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def paced(clients: int, rps_per_client: float) -> list[str]:
    """h2load's options that start `clients` one after another, evenly over one client's
    period (1 / rps_per_client): in groups of `-r` every `--rate-period` (whole ms)."""
    period_ms = 1000 / rps_per_client
    if clients <= period_ms:
        return ["-r", "1", f"--rate-period={max(1, math.floor(period_ms / clients))}ms"]
    return ["-r", str(math.ceil(clients / period_ms)), "--rate-period=1ms"]


def h2load(
    request: Request,
    *,
    clients: int,
    seconds: float,
    rps_per_client: float | None = None,
    streams: int = 1,
    cpus: str | None = None,
    count: int | None = None,
) -> Run:
    """Closed loop (each client sends its next request when the last is answered) for
    `seconds` after a short warm-up, or `count` requests (then `seconds` only bounds the
    wait); or at a fixed rate, `rps_per_client` per client for about `seconds`, its
    clients' starts staggered (see paced())."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.log"
        args = [
            *_taskset(cpus),
            "h2load",
            "-c", str(clients),
            "-m", str(streams),
            f"--log-file={log}",
        ]  # fmt: skip
        interval_ms = None
        if rps_per_client is not None:
            # A client may have `streams` requests out before its sends fall behind.
            interval_ms = 1000 * streams / rps_per_client
            # h2load's -r (staggered starts) needs a request count, not a duration.
            count = max(clients, round(clients * rps_per_client * seconds))
            args += [f"--rps={rps_per_client:g}", *paced(clients, rps_per_client)]
        if count is not None:
            args += ["-n", str(count)]
        else:
            args += ["-D", f"{round(seconds * 1000)}ms", "--warm-up-time", "300ms"]
        if request.h1:
            args.append("--h1")
        if request.body is not None:
            args += ["-d", str(request.body)]
        for header in request.headers:
            args += ["-H", header]
        args.append(request.url)
        out = subprocess.run(
            args, capture_output=True, text=True, timeout=seconds * 3 + 60, check=True
        ).stdout
        latencies = _latencies(log, interval_ms)
    return _summary(out, latencies, seconds if count is None else None)


def _latencies(log: Path, interval_ms: float | None = None) -> list[float]:
    """Milliseconds of each answered request (status 2xx), sorted, from when h2load sent
    it. At a fixed rate, a client whose answer takes longer than its send `interval_ms`
    sends its next requests late (coordinated omission): as HdrHistogram's
    recordValueWithExpectedInterval does, each such answer of L ms also counts the
    requests that should have gone out meanwhile, at L - interval, L - 2 x interval, ...
    while above the interval."""
    values = []
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].startswith("2"):
            value = int(parts[2]) / 1000
            values.append(value)
            while interval_ms and value - interval_ms >= interval_ms:
                value -= interval_ms
                values.append(value)
    return sorted(values)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s, ([\d.]+)([KMG]?B)/s")
_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded")
_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def _summary(out: str, latencies: list[float], seconds: float | None) -> Run:
    finished = _FINISHED.search(out)
    counts = _REQUESTS.search(out)
    if finished is None or counts is None:
        raise RuntimeError(f"h2load said:\n{out[-2000:]}")
    # h2load's counts are over the main duration (-D, without the warm-up), or until
    # the last of `-n` requests was answered.
    if seconds is None:
        seconds = float(finished[1]) / (1000 if finished[2] == "ms" else 1)
    return Run(
        requests=int(counts[1]),
        succeeded=int(counts[2]),
        seconds=seconds,
        bytes_per_s=float(finished[4]) * _UNITS[finished[5]],
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
    )


def wrk(request: Request, *, connections: int, seconds: float, cpus: str | None = None) -> float:
    """Requests per second wrk reaches with `connections` (one thread): closed loop."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [*_taskset(cpus), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
        if request.body is not None:
            script = Path(tmp) / "post.lua"
            headers = "\n".join(
                f'wrk.headers["{name.strip()}"] = "{value.strip()}"'
                for name, value in (h.split(":", 1) for h in request.headers)
            )
            script.write_text(WRK_POST.format(body=request.body, headers=headers))
            args += ["-s", str(script)]
        args.append(request.url)
        out = subprocess.run(
            args, capture_output=True, text=True, timeout=seconds + 60, check=True
        ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"wrk said:\n{out[-2000:]}")
    return float(match[1])
