"""The load generators: h2load (nghttp2-client) for every figure with latencies, HTTP/1.1
and gRPC alike, and wrk for the generator's ceiling. Both are compiled, run in their
own process, and are pinned to their own core when `cpus` says which.

h2load writes one line per request (start, status, microseconds) with --log-file,
from which the percentiles are read; a fixed offered rate is `clients x --rps`.
"""

from __future__ import annotations

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
    """Closed loop (each client sends its next request when the last is answered), or at
    `rps_per_client` per client; for `seconds` after a short warm-up, or `count`
    requests (then `seconds` only bounds the wait)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.log"
        args = [
            *_taskset(cpus),
            "h2load",
            "-c", str(clients),
            "-m", str(streams),
            f"--log-file={log}",
        ]  # fmt: skip
        if count is not None:
            args += ["-n", str(count)]
        else:
            args += ["-D", f"{round(seconds * 1000)}ms", "--warm-up-time", "300ms"]
        if request.h1:
            args.append("--h1")
        if rps_per_client is not None:
            args.append(f"--rps={rps_per_client:g}")
        if request.body is not None:
            args += ["-d", str(request.body)]
        for header in request.headers:
            args += ["-H", header]
        args.append(request.url)
        out = subprocess.run(
            args, capture_output=True, text=True, timeout=seconds + 60, check=True
        ).stdout
        latencies = _latencies(log)
    return _summary(out, seconds, latencies)


def _latencies(log: Path) -> list[float]:
    """Milliseconds of each answered request (status 2xx), sorted."""
    values = []
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].startswith("2"):
            values.append(int(parts[2]) / 1000)
    return sorted(values)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s, ([\d.]+)([KMG]?B)/s")
_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded")
_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def _summary(out: str, seconds: float, latencies: list[float]) -> Run:
    finished = _FINISHED.search(out)
    counts = _REQUESTS.search(out)
    if finished is None or counts is None:
        raise RuntimeError(f"h2load said:\n{out[-2000:]}")
    # h2load's figures are over the main duration (-D), without the warm-up.
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
