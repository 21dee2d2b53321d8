"""`imagegate serve --workers 2`, as a user runs it: two service processes and two REST
fronts on shared ports under one supervisor, on one SQLite database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
from imagegate.v1 import images_pb2, images_pb2_grpc

from service.catalog import load_catalog
from tests.fakes.base import Fault
from tests.ops_kit import held_count, poll, scrape
from tests.providers_harness import UNIT_PRICE
from tests.test_drain import CREDIT, Setup, generate, money
from tests.test_drain import setup as setup  # the fixture: a slow upstream, an account

KEY_RE = re.compile(r"sk-[A-Za-z0-9_-]{20,}")
READY_RE = re.compile(r"imagegate: (service|front)-(\d+) pid (\d+) ready(?: on (\S+))?")
DEMO_CREDIT = 5_000_000
PRICE = load_catalog(None).models["local"].prices[("256x256", "standard")]
BODY = {
    "model": "local",
    "prompt": "a lighthouse",
    "size": "256x256",
    "response_format": "b64_json",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    process: asyncio.subprocess.Process
    rest: str
    metrics: str
    db: Path
    key: str
    output: list[str] = field(default_factory=list)

    def ready(self) -> dict[str, tuple[int, str | None]]:
        """The latest ready line of each worker: name -> (pid, private address)."""
        found: dict[str, tuple[int, str | None]] = {}
        for line in self.output:
            if m := READY_RE.search(line):
                found[f"{m[1]}-{m[2]}"] = (int(m[3]), m[4])
        return found


@contextlib.asynccontextmanager
async def serve_workers(
    tmp: Path, *flags: str, data_dir: Path | None = None, demo: bool = True
) -> AsyncIterator[Served]:
    """`imagegate serve --workers 2 [--demo]`; the test ends it (SIGTERM), else it is killed."""
    data_dir = data_dir or tmp / "data"
    rest, grpc_port, metrics = _free_port(), _free_port(), _free_port()
    with (tmp / "serve.log").open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--workers",
            "2",
            *(["--demo"] if demo else []),
            *flags,
            "--data-dir",
            str(data_dir),
            "--rest-port",
            str(rest),
            "--grpc-port",
            str(grpc_port),
            "--metrics-address",
            f"127.0.0.1:{metrics}",
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert process.stdout is not None
    stdout = process.stdout
    served = Served(
        process, f"http://127.0.0.1:{rest}", f"http://127.0.0.1:{metrics}/metrics",
        data_dir / "imagegate.db", "",
    )  # fmt: skip

    async def read() -> None:
        while line := await stdout.readline():
            served.output.append(line.decode())

    reader = asyncio.create_task(read())
    try:

        async def started() -> bool:
            assert process.returncode is None, (tmp / "serve.log").read_text()[-3000:]
            return any("Ctrl-C stops" in line for line in served.output)

        await poll(started, timeout_s=90)
        if demo:
            key = KEY_RE.search("".join(served.output))
            assert key, served.output
            served.key = key.group()
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        reader.cancel()


async def _generate(session: aiohttp.ClientSession, served: Served) -> int:
    async with session.post(
        served.rest + "/v1/images/generations",
        json=BODY,
        headers={"Authorization": f"Bearer {served.key}"},
    ) as resp:
        await resp.read()
        return resp.status


async def _burst(served: Served, count: int) -> list[int]:
    """`count` generations at once, each on its own connection (so both fronts get some)."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        return list(await asyncio.gather(*(_generate(session, served) for _ in range(count))))


def _money(db: Path) -> tuple[int, int, int, int]:
    """(balance, ledger sum, settled reservations, their cost) of the demo account."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (balance,) = conn.execute(
            "SELECT balance_micros FROM accounts WHERE name='demo'"
        ).fetchone()
        (ledger,) = conn.execute("SELECT SUM(delta_micros) FROM ledger").fetchone()
        settled, cost = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(cost_micros), 0) FROM reservations "
            "WHERE status = 'settled'"
        ).fetchone()
    return int(balance), int(ledger), int(settled), int(cost)


async def _sigterm_exits_0(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(served.process.wait(), 60) == 0
    # Every worker ended with the supervisor.
    for pid, _ in served.ready().values():
        assert _gone(pid), pid


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_concurrent_generations_are_charged_once_each(tmp_path: Path) -> None:
    async with serve_workers(tmp_path) as served:
        assert set(served.ready()) == {"service-0", "service-1", "front-0", "front-1"}
        statuses = await _burst(served, 60)
        assert statuses == [200] * 60
        balance, ledger, settled, cost = await asyncio.to_thread(_money, served.db)
        assert settled == 60 and cost == 60 * PRICE
        assert balance == ledger == DEMO_CREDIT - 60 * PRICE
        assert await asyncio.to_thread(held_count, served.db) == 0
        # Both fronts' requests, and both services' calls, in the supervisor's one scrape.
        scraped = await scrape(served.metrics)
        assert scraped.value("imagegate_http_requests_total", status="200") == 60
        assert scraped.value("imagegate_requests_total", rpc="GenerateImages", status="OK") == 60
        await _sigterm_exits_0(served)


async def test_a_killed_worker_is_started_again(tmp_path: Path) -> None:
    async with serve_workers(tmp_path) as served:
        before = served.ready()
        for name in ("service-0", "front-1"):
            os.kill(before[name][0], signal.SIGKILL)

        async def restarted() -> bool:
            now = served.ready()
            return all(now[n][0] != before[n][0] for n in ("service-0", "front-1"))

        await poll(restarted, timeout_s=60)
        # The service worker is back on its private port, where the fronts find it.
        assert served.ready()["service-0"][1] == before["service-0"][1]
        statuses = await _burst(served, 30)
        assert statuses == [200] * 30
        balance, ledger, settled, _ = await asyncio.to_thread(_money, served.db)
        assert settled == 30 and balance == ledger == DEMO_CREDIT - 30 * PRICE
        await _sigterm_exits_0(served)


async def test_one_scrape_counts_every_worker(tmp_path: Path) -> None:
    async with serve_workers(tmp_path) as served:
        ready = served.ready()
        sent = {"service-0": 3, "service-1": 5}
        for name, count in sent.items():
            # Straight to each worker's own port: both surely serve some.
            address = ready[name][1]
            assert address
            async with grpc.aio.insecure_channel(address) as channel:
                stub = images_pb2_grpc.ImageServiceStub(channel)
                for _ in range(count):
                    await stub.GenerateImages(
                        images_pb2.GenerateImagesRequest(**BODY),
                        metadata=(("authorization", f"Bearer {served.key}"),),
                    )
        scraped = await scrape(served.metrics)
        assert scraped.value("imagegate_requests_total", rpc="GenerateImages", status="OK") == 8
        assert scraped.value("imagegate_images_generated_total", model="local") == 8
        assert scraped.value("imagegate_ready") == 1
        await _sigterm_exits_0(served)


async def test_sigterm_lets_every_worker_finish_its_request(setup: Setup, tmp_path: Path) -> None:
    setup.fake.stall_s = 3.0
    setup.fake.inject(*[Fault.STALL] * 4)  # the upstream answers each after 3 s
    flags = ("--catalog", str(setup.catalog), "--drain-grace", "30")
    async with serve_workers(tmp_path, *flags, data_dir=setup.data_dir, demo=False) as served:
        pending = [generate(setup, served.rest) for _ in range(4)]

        async def all_held() -> bool:  # every request in a worker before the signal
            return await asyncio.to_thread(held_count, setup.db) == 4

        await poll(all_held)
        served.process.send_signal(signal.SIGTERM)
        replies = await asyncio.gather(*pending)
        assert [r.status for r in replies] == [200] * 4, [r.body[:200] for r in replies]
        assert await asyncio.wait_for(served.process.wait(), 60) == 0
    assert money(setup.db) == (CREDIT - 4 * UNIT_PRICE, CREDIT - 4 * UNIT_PRICE, 0)


async def test_a_busy_port_stops_them_all_with_a_message(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [
            sys.executable, "-m", "service.cli", "serve", "--workers", "2",
            "--data-dir", str(tmp_path), "--rest-port", str(busy.getsockname()[1]),
            "--grpc-port", str(_free_port()), "--metrics-address", "off",
        ]  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 1, out.decode()
    assert "address already in use" in err.decode() and "Traceback" not in err.decode()
    # The service workers that did start were stopped with the supervisor.
    for m in READY_RE.finditer(out.decode()):
        assert _gone(int(m[3]))


def _core_list(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split()[1]
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def _remote_ports(pid: int) -> set[int]:
    """The loopback ports pid's established TCP connections lead to (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (m := re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))) is not None:
                inodes.add(m[1])
    ports = set()
    for table in ("tcp", "tcp6"):  # gRPC's sockets are IPv6 ones, IPv4-mapped
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "01" and cols[9] in inodes:  # ESTABLISHED
                ports.add(int(cols[2].split(":")[1], 16))
    return ports


def _holders(db: Path, after: int) -> set[int]:
    """The pids of the service workers that held the reservations after rowid `after`."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT DISTINCT i.pid FROM reservations r JOIN instances i ON i.id = r.owner "
            "WHERE r.rowid > ?",
            (after,),
        ).fetchall()
    return {pid for (pid,) in rows}


def _last_reservation(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (rowid,) = conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM reservations").fetchone()
    return int(rowid)


async def _lone_requests_stay_with_their_worker(served: Served) -> int:
    """Generations one at a time on one connection, from new client ports until both
    fronts have had one: each front's all went to its own worker's service. Returns how
    many were sent."""
    ready = served.ready()
    seen: set[int] = set()
    first = await asyncio.to_thread(_last_reservation, served.db)
    for _ in range(30):
        client_port = _free_port()
        after = await asyncio.to_thread(_last_reservation, served.db)
        connector = aiohttp.TCPConnector(limit=1, local_addr=("127.0.0.1", client_port))
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(5):
                assert await _generate(session, served) == 200
            (slot,) = [s for s in (0, 1) if client_port in _remote_ports(ready[f"front-{s}"][0])]
        holders = await asyncio.to_thread(_holders, served.db, after)
        assert holders == {ready[f"service-{slot}"][0]}, (slot, holders)
        seen.add(slot)
        if seen == {0, 1}:
            return await asyncio.to_thread(_last_reservation, served.db) - first
    raise AssertionError(f"the kernel gave every connection to front {seen}")


async def test_a_lone_request_stays_with_its_worker_and_a_burst_reaches_all(
    tmp_path: Path,
) -> None:
    async with serve_workers(tmp_path) as served:
        await _lone_requests_stay_with_their_worker(served)
        services = {served.ready()[f"service-{s}"][0] for s in (0, 1)}
        holders: set[int] = set()
        for _ in range(3):  # a front's spread channel connects on its first call
            after = await asyncio.to_thread(_last_reservation, served.db)
            assert await _burst(served, 40) == [200] * 40
            holders |= await asyncio.to_thread(_holders, served.db, after)
            if holders == services:
                break
        assert holders == services
        await _sigterm_exits_0(served)


async def test_pinned_workers_keep_a_request_on_its_core_and_fail_over(tmp_path: Path) -> None:
    async with serve_workers(tmp_path, "--pin-workers") as served:
        ready = served.ready()
        cores = sorted(os.sched_getaffinity(0))
        private = {n: int(str(a).rsplit(":", 1)[1]) for n, (_, a) in ready.items() if a}
        for slot in (0, 1):
            core = str(cores[slot % len(cores)])
            front, service = ready[f"front-{slot}"][0], ready[f"service-{slot}"][0]
            # The worker's service and front both on its one core...
            assert _core_list(front) == _core_list(service) == core
        # ...and a request alone stays there.
        lone = await _lone_requests_stay_with_their_worker(served)
        # A front whose own service is down calls the next one. The supervisor is held
        # stopped meanwhile, so that service-0 stays down rather than coming back.
        served.process.send_signal(signal.SIGSTOP)
        try:
            os.kill(ready["service-0"][0], signal.SIGKILL)

            async def noticed() -> bool:  # front-0 saw its connection end
                return private["service-0"] not in _remote_ports(ready["front-0"][0])

            await poll(noticed)
            assert await _burst(served, 20) == [200] * 20
            assert _remote_ports(ready["front-0"][0]) & set(private.values()) == {
                private["service-1"]
            }
        finally:
            served.process.send_signal(signal.SIGCONT)
        balance, ledger, settled, _ = await asyncio.to_thread(_money, served.db)
        assert settled == lone + 20 and balance == ledger == DEMO_CREDIT - settled * PRICE
        await _sigterm_exits_0(served)
