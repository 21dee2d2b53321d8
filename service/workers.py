"""`imagegate serve --workers N`: one supervisor, N service processes, N REST fronts.

Python runs one core per process, so `serve` on a machine of N cores runs N of
each. The service workers share the public gRPC port and the fronts the public
REST port (SO_REUSEPORT: the kernel spreads connections over them); each
service worker also listens on a private loopback port, and every front
dials all of those: a request alone goes to its own worker's service, and
calls at once are spread over every service (gateway/channels.py), so a front
is never tied to one service worker and skips one that is down. With
`pin_workers`, worker i's service and front also run on core i alone. They
share the database (SQLite in WAL mode takes several writer processes: every
write is a BEGIN IMMEDIATE transaction under a busy timeout, see
store/sqlite.py).

The supervisor starts them, starts again any that dies (with a backoff if it
keeps dying), and on SIGTERM or SIGINT passes the signal on, so that each
drains as a single `serve` does (a second signal forces them), then exits 0.
It serves /metrics for all of them: each writes its series to a private
PROMETHEUS_MULTIPROC_DIR and one scrape sums them (admin_http.py); the gauges
of a worker that ends are forgotten (metrics.mark_dead).

Workers are started with multiprocessing's "spawn" (a fresh interpreter: no
inherited event loop or gRPC state), in a process group of their own (a
terminal's Ctrl-C reaches the supervisor only, which passes it on once), and
told to end if the supervisor dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from gateway.config import GatewayConfig
from gateway.server import drain_gateway, start_gateway
from service import aio, heap, logs, metrics, stall_watch, tracing
from service.admin_http import multiprocess_metrics, start_admin
from service.config import Config
from service.lifecycle import stop_signals
from service.links import url_host
from service.server import start_service

log = logging.getLogger("imagegate.workers")
SERVICE, FRONT = "service", "front"
# A worker that dies sooner than this after starting is started again after a
# growing pause (up to MAX_BACKOFF_S), not at once in a loop.
STEADY_S = 5.0
FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 10.0
READY_TIMEOUT_S = 60.0
# After the drain's grace period: how long the supervisor waits before SIGKILL.
STOP_MARGIN_S = 10.0


def default_workers() -> int:
    """The cores this process may run on (taskset and cgroup cpusets included)."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Plan:
    """What every worker needs, sent to each as it is spawned."""

    config: Config
    gateway: GatewayConfig
    private_ports: tuple[int, ...]
    rest_url: str
    log_level: str

    def front_config(self, slot: int) -> GatewayConfig:
        """What front `slot` dials: every service worker's private address, its own
        worker's first (the one a lone call prefers, then the next while it does not
        answer: gRPC's pick_first goes down the list in order)."""
        ports = self.private_ports[slot:] + self.private_ports[:slot]
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        return replace(
            self.gateway, grpc_target=target, grpc_round_robin=True, grpc_prefer_first=True
        )


@dataclass
class Worker:
    role: str
    slot: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    backoff_s: float = 0.0
    restarts: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.slot}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None


def free_port(host: str) -> int:
    """A port free now on `host` (ports the workers must agree on before they bind)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def supervise(
    config: Config,
    gateway: GatewayConfig,
    count: int,
    log_level: str,
    prepare: Callable[[str], Awaitable[None]] | None = None,
) -> int:
    """Run `count` service workers and `count` fronts until SIGTERM or SIGINT; 0 when
    they have all drained and ended, 1 when they could not start."""
    host = url_host(gateway.host)
    grpc_port = config.grpc_port or free_port(config.host)
    rest_port = gateway.rest_port or free_port(gateway.host)
    rest_url = f"http://{host}:{rest_port}"
    plan = Plan(
        # The supervisor serves every worker's metrics; the workers serve none.
        config=replace(config, grpc_port=grpc_port, metrics_address="off"),
        gateway=replace(gateway, rest_port=rest_port),
        private_ports=tuple(free_port("127.0.0.1") for _ in range(count)),
        rest_url=rest_url,
        log_level=log_level,
    )
    if prepare is not None:
        await prepare(rest_url)
    if not config.redis_url:
        log.info(
            "per-key limits are counted in each of the %d service workers: "
            "IMAGEGATE_REDIS_URL shares them",
            count,
        )
    stop, force = stop_signals()
    with multiprocess_metrics():
        supervisor = Supervisor(plan, count)
        async with contextlib.AsyncExitStack() as stack:
            admin = await start_admin(config.metrics_address)
            if admin is not None:
                stack.push_async_callback(admin.cleanup)
            stack.push_async_callback(supervisor.stop, force)
            if not await supervisor.start(stop):
                return 1
            print(
                f"imagegate: REST on {rest_url}, gRPC on {config.host}:{grpc_port}, "
                f"{count} service workers and {count} fronts. Ctrl-C stops.",
                flush=True,
            )
            await stop.wait()
    return 0


class Supervisor:
    def __init__(self, plan: Plan, count: int) -> None:
        self.plan = plan
        self.context = multiprocessing.get_context("spawn")
        self.workers = [Worker(role, slot) for role in (SERVICE, FRONT) for slot in range(count)]
        self.stopping = False
        self._restarts: set[asyncio.Task[None]] = set()

    async def start(self, stop: asyncio.Event) -> bool:
        """Every service worker, then every front, each ready; False if one failed."""
        for role in (SERVICE, FRONT):
            group = [w for w in self.workers if w.role == role]
            ready = await asyncio.gather(*(self._spawn(w) for w in group))
            if not all(ready) or stop.is_set():
                return stop.is_set()
        return True

    async def _spawn(self, worker: Worker) -> bool:
        """Start `worker`, watch for its end, and wait until it serves (True)."""
        target = _service_main if worker.role == SERVICE else _front_main
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=target, args=(self.plan, worker.slot, sender), name=f"imagegate-{worker.name}"
        )
        worker.process, worker.started_at = process, time.monotonic()
        worker.exited = asyncio.Event()
        process.start()
        sender.close()  # the child's end: closed here, so its death reads as EOF
        loop = asyncio.get_running_loop()
        loop.add_reader(process.sentinel, self._ended, worker, process)
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                ready = await _receive(receiver)
        except TimeoutError:
            ready = False
        finally:
            receiver.close()
        if ready:
            print(
                f"imagegate: {worker.name} pid {process.pid} ready"
                + (
                    f" on 127.0.0.1:{self.plan.private_ports[worker.slot]}"
                    if worker.role == SERVICE
                    else ""
                ),
                flush=True,
            )
        elif not self.stopping:
            log.error("%s (pid %s) did not start", worker.name, process.pid)
        return ready

    def _ended(self, worker: Worker, process: BaseProcess) -> None:
        asyncio.get_running_loop().remove_reader(process.sentinel)
        process.join(0)
        metrics.mark_dead(process.pid or 0)
        worker.exited.set()
        if self.stopping or worker.process is not process:
            return
        lived = time.monotonic() - worker.started_at
        worker.backoff_s = (
            FIRST_BACKOFF_S
            if lived > STEADY_S
            else min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, worker.backoff_s * 2))
        )
        log.warning(
            "%s (pid %s) exited with %s after %.1f s; starting it again in %.1f s",
            worker.name, process.pid, process.exitcode, lived, worker.backoff_s,
        )  # fmt: skip
        task = asyncio.create_task(self._restart(worker))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, worker: Worker) -> None:
        await asyncio.sleep(worker.backoff_s)
        if not self.stopping:
            worker.restarts += 1
            await self._spawn(worker)

    async def stop(self, force: asyncio.Event) -> None:
        """SIGTERM to each (each drains), again if `force` is set; SIGKILL what outlives
        the grace period; wait for all."""
        self.stopping = True
        for task in list(self._restarts):
            task.cancel()
        live = [w for w in self.workers if w.alive]
        self._signal(live, signal.SIGTERM)
        everyone: asyncio.Future[Any] = asyncio.gather(*(w.exited.wait() for w in live))
        forced: asyncio.Future[Any] = asyncio.ensure_future(force.wait())
        deadline = self.plan.config.drain_grace_s + STOP_MARGIN_S
        try:
            done, _ = await asyncio.wait(
                {everyone, forced}, timeout=deadline, return_when="FIRST_COMPLETED"
            )
            if forced in done:
                self._signal([w for w in live if w.alive], signal.SIGTERM)
                await asyncio.wait({everyone}, timeout=STOP_MARGIN_S)
        finally:
            forced.cancel()
        late = [w for w in live if w.alive]
        if late:
            log.warning(
                "killing %s: still running after the drain", ", ".join(w.name for w in late)
            )
            self._signal(late, signal.SIGKILL)
            await asyncio.wait_for(everyone, STOP_MARGIN_S)

    @staticmethod
    def _signal(workers: list[Worker], signum: int) -> None:
        for worker in workers:
            if worker.process is not None and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signum)


async def _receive(receiver: Connection) -> bool:
    """True once the child sends that it is ready; False if it ends first."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(receiver.fileno(), readable.set)
    try:
        await readable.wait()
    finally:
        loop.remove_reader(receiver.fileno())
    try:
        return bool(receiver.recv())
    except EOFError:
        return False


# In the workers


def _detach() -> None:
    """Own process group (a terminal's Ctrl-C is for the supervisor, which passes it on
    once), and SIGTERM when the supervisor dies (Linux), so no worker outlives it."""
    os.setpgrp()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor died before prctl
        sys.exit(1)


def _run(plan: Plan, main: Callable[[], Coroutine[Any, Any, None]], role: str, slot: int) -> None:
    _detach()
    if plan.config.pin_workers:
        pin(slot)
    logs.setup(plan.log_level, plan.config.log_format)
    shutdown = tracing.configure()
    try:
        with asyncio.Runner(loop_factory=aio.loop_factory(plan.config.uvloop)) as runner:
            runner.run(stall_watch.watched(main(), role, plan.config.stall_log))
    except (OSError, ValueError) as exc:
        print(f"imagegate: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if shutdown is not None:
            shutdown()


def pin(slot: int) -> None:
    """This process (and the threads it starts from now on) onto one core: the slot-th of
    those it may use, counting round when there are more slots than cores. Nothing where
    the system has no CPU affinity (macOS)."""
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[slot % len(cores)]})


def _ready(ready: Connection) -> None:
    heap.freeze_start_up()
    ready.send(True)
    ready.close()


def _service_main(plan: Plan, slot: int, ready: Connection) -> None:
    async def main() -> None:
        stop, force = stop_signals()
        service = await start_service(
            plan.config,
            rest_url=plan.rest_url,
            private_port=plan.private_ports[slot],
            reuse_port=True,
        )
        try:
            _ready(ready)
            await stop.wait()
            await service.drain(plan.config.drain_grace_s, force)
        finally:
            await service.stop()

    _run(plan, main, "service", slot)


def _front_main(plan: Plan, slot: int, ready: Connection) -> None:
    async def main() -> None:
        stop, force = stop_signals()
        config = plan.front_config(slot)
        runner = await start_gateway(config, reuse_port=True)
        try:
            _ready(ready)
            await stop.wait()
            await drain_gateway(runner, config.drain_grace_s, force)
        finally:
            await runner.cleanup()

    _run(plan, main, "front", slot)
