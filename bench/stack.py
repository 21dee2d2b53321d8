"""The processes the bench measures, all on 127.0.0.1: the fake upstream, `imagegate serve
--workers N` with billing on SQLite, Envoy in front of its service workers,
LiteLLM's proxy passing through to the same fake, and the skeleton
(bench/skeleton.py). Each is stopped by its pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_MODEL = "bench"
# The fake answers this size with ~1.5 MB images, any other with ~1 KB.
SMALL_SIZE, LARGE_SIZE = "1024x1024", "1792x1024"
PRICE_MICROS = 1000
CREDIT_MICROS = 10**12  # $1M: the most one operation may add
READY_RE = re.compile(r"imagegate: (service|front)-(\d+) pid (\d+) ready(?: on (\S+))?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def catalog_toml(fake_port: int) -> str:
    """The fake as an `openai_compatible` provider, for the model `bench`. Priced, so
    that every call reserves and settles."""
    return f"""
[providers.fake]
kind = "openai_compatible"
base_url = "http://127.0.0.1:{fake_port}/v1"
max_n = 10
timeout_s = 30

[models.{BENCH_MODEL}]
routes = [{{ provider = "fake", upstream_model = "bench-upstream" }}]
sizes = ["{SMALL_SIZE}", "{LARGE_SIZE}"]
default_size = "{SMALL_SIZE}"
qualities = ["standard"]
default_quality = "standard"
n_max = 10
prompt_max_chars = 1000
output_formats = ["png"]
prices = {{ standard = {{ "{SMALL_SIZE}" = {PRICE_MICROS}, "{LARGE_SIZE}" = {PRICE_MICROS} }} }}
"""


def litellm_yaml(fake_port: int) -> str:
    """LiteLLM's `bench` passes through to the fake as OpenAI's dall-e-2 (a model it knows
    takes response_format, n and size; the fake answers any model the same)."""
    return f"""model_list:
  - model_name: {BENCH_MODEL}
    litellm_params:
      model: openai/dall-e-2
      api_base: http://127.0.0.1:{fake_port}/v1
      api_key: unused
general_settings:
  master_key: {LITELLM_KEY}
"""


LITELLM_KEY = "sk-bench-litellm-master"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    with log.open("wb") as out:
        popen = subprocess.Popen(
            args,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return Proc(name, popen)


def wait_for(check: object, what: str, proc: Proc, log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if callable(check) and check():
            return
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.popen.returncode}):\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s:\n{_tail(log)}")
        time.sleep(0.1)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Imagegate:
    proc: Proc
    rest_url: str
    grpc_port: int
    key: str
    data_dir: Path
    services: list[int] = field(default_factory=list)
    fronts: list[int] = field(default_factory=list)
    private: list[int] = field(default_factory=list)


def start_fake(work: Path) -> tuple[Proc, int]:
    port = free_port()
    log = work / "fake.log"
    proc = spawn("fake", [sys.executable, "bench/fake_upstream.py", str(port)], log)
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/ping"), "fake upstream", proc, log)
    return proc, port


def start_imagegate(
    work: Path, fake_port: int, workers: int, *flags: str, cpus: str | None = None
) -> Imagegate:
    """`serve --workers N [flags]`, each worker's event-loop stalls logged under
    work/stalls (service/stall_watch.py); on `cpus` alone when given (taskset)."""
    work.mkdir(exist_ok=True)
    data_dir = work / "imagegate"
    stalls = work / "stalls"
    stalls.mkdir(exist_ok=True)
    catalog = work / "catalog.toml"
    catalog.write_text(catalog_toml(fake_port))
    key = asyncio.run(_account(data_dir))
    rest, grpc_port = free_port(), free_port()
    log = work / "imagegate.log"
    proc = spawn(
        "imagegate",
        [
            *(["taskset", "-c", cpus] if cpus else []),
            str(REPO / ".venv" / "bin" / "imagegate"),
            "--log-level", "warning",
            "serve",
            *flags,
            "--workers", str(workers),
            "--data-dir", str(data_dir),
            "--catalog", str(catalog),
            "--rest-port", str(rest),
            "--grpc-port", str(grpc_port),
            "--metrics-address", "off",
        ],
        log,
        env={"IMAGEGATE_STALL_LOG": str(stalls)},
    )  # fmt: skip
    wait_for(lambda: "Ctrl-C stops" in log.read_text(errors="replace"), "imagegate", proc, log)
    gate = Imagegate(proc, f"http://127.0.0.1:{rest}", grpc_port, key, data_dir)
    for m in READY_RE.finditer(log.read_text()):
        if m[1] == "service":
            gate.services.append(int(m[3]))
            gate.private.append(int(m[4].rsplit(":", 1)[1]))
        else:
            gate.fronts.append(int(m[3]))
    if workers == 1:  # one process is both
        gate.services = gate.fronts = [proc.pid]
    return gate


async def _account(data_dir: Path) -> str:
    """An account with credit enough for any run, and its key."""
    sys.path.insert(0, str(REPO))
    from service import keys
    from service.store.sqlite import SqliteStore

    store = SqliteStore(data_dir / "imagegate.db")
    await store.open()
    try:
        await store.create_account("bench", CREDIT_MICROS)
        key = keys.new_key()
        await store.create_key("bench", keys.hash_key(key), keys.display_prefix(key), "bench", None)
    finally:
        await store.close()
    return key


def longest_stalls(
    work: Path, groups: dict[str, list[int]], start: float, end: float
) -> dict[str, float]:
    """The longest event-loop stall (ms) of each group's processes between `start` and
    `end` (unix time), from the watch's one line per second."""
    longest: dict[str, float] = {}
    for group, pids in groups.items():
        for pid in pids:
            for log in (work / "stalls").glob(f"*-{pid}.log"):
                for line in log.read_text().splitlines():
                    second, ms = line.split()
                    if int(start) <= int(second) <= end:
                        longest[group] = max(longest.get(group, 0.0), float(ms))
    return longest


def settled_count(data_dir: Path) -> int:
    import sqlite3

    with contextlib.closing(sqlite3.connect(data_dir / "imagegate.db")) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM reservations WHERE status='settled'").fetchone()
    return int(count)


@contextlib.contextmanager
def envoy(gate: Imagegate, concurrency: int) -> Iterator[tuple[str, int]]:
    """The committed envoy.yaml, its cluster listing every service worker's own port."""
    sys.path.insert(0, str(REPO))
    from tests.envoy_harness import CLUSTER, EnvoyFront, patched_config

    config = patched_config(gate.private[0] if gate.private else gate.grpc_port)
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == CLUSTER]
    [locality] = cluster["load_assignment"]["endpoints"]
    ports = gate.private or [gate.grpc_port]
    locality["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports
    ]
    cluster["lb_policy"] = "ROUND_ROBIN"

    async def start() -> EnvoyFront:
        return await EnvoyFront.from_config(config, concurrency=concurrency)

    front = asyncio.run(start())
    try:
        yield front.base_url, front.pid
    finally:
        asyncio.run(front.stop())


@dataclass
class Skeleton:
    proc: Proc
    rest_port: int
    grpc_port: int
    fronts: list[int]
    services: list[int]

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"


def start_skeleton(work: Path, fake_port: int, workers: int) -> Skeleton:
    """bench/skeleton.py: the layout of `serve --workers N` with none of imagegate's work."""
    grpc_port, rest_port = free_port(), free_port()
    log = work / "skeleton.log"
    fake_url = f"http://127.0.0.1:{fake_port}"
    argv = [sys.executable, "bench/skeleton.py", fake_url, str(grpc_port), str(rest_port)]
    proc = spawn("skeleton", [*argv, str(workers)], log)
    # Each of its 2N processes says so once it listens.
    wait_for(lambda: log.read_text().count(" ready") == 2 * workers, "skeleton", proc, log)
    children = [p for p in descendants(proc.pid) if p != proc.pid]
    roles = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children}
    return Skeleton(
        proc,
        rest_port,
        grpc_port,
        fronts=[pid for pid, argv in roles.items() if b"--rest" in argv],
        services=[pid for pid, argv in roles.items() if b"--grpc" in argv],
    )


def start_litellm(work: Path, fake_port: int, workers: int) -> tuple[Proc, str]:
    from bench import litellm_env

    binary = litellm_env.ensure()
    config = work / "litellm.yaml"
    config.write_text(litellm_yaml(fake_port))
    port = free_port()
    log = work / "litellm.log"
    proc = spawn(
        "litellm",
        [
            str(binary),
            "--config", str(config),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--num_workers", str(workers),
        ],
        log,
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    ready = f"{url}/health/liveliness"
    wait_for(lambda: http_ok(ready), "litellm", proc, log, timeout_s=180)
    return proc, url


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it (LiteLLM's workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def litellm_version() -> str:
    from bench import litellm_env

    return litellm_env.VERSION
