"""After a crash: what a dead process held is released at once, what a live one holds is not."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc

from service import keys
from service.instances import Liveness
from service.server import message_size_options
from service.store.base import Charge, Store
from service.store.sqlite import SqliteStore
from tests.conftest import store_for

CREDIT = 1_000_000
# Four hd 1792x1024 images: long enough a render to be caught holding money.
SLOW = images_pb2.GenerateImagesRequest(
    model="local",
    prompt="a slow harbour",
    n=4,
    size="1792x1024",
    quality="hd",
    response_format="b64_json",
)


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve_grpc(data_dir: Path) -> Served:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "serve-grpc",
        "--data-dir",
        str(data_dir),
        "--grpc-port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # A long heartbeat: the frozen process below must stay "alive" however slowly a
        # loaded machine starts the others; the killed one is found dead by its pid.
        env={**os.environ, "PYTHONUNBUFFERED": "1", "IMAGEGATE_HEARTBEAT_INTERVAL_S": "60"},
    )
    assert proc.stdout
    output = b""
    try:
        async with asyncio.timeout(90):
            while b"Ctrl-C stops" not in output:
                line = await proc.stdout.readline()
                assert line, f"serve-grpc exited early:\n{output.decode()}"
                output += line
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return Served(proc, port)


async def _end(served: Served) -> None:
    if served.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            served.proc.send_signal(signal.SIGCONT)
            served.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(served.proc.wait(), 15)
        except TimeoutError:
            served.proc.kill()
            await served.proc.wait()


def _query(db: Path, sql: str, *args: Any) -> list[Any]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


async def _held(db: Path, account: str) -> set[str]:
    rows = await asyncio.to_thread(
        _query,
        db,
        "SELECT r.id FROM reservations r JOIN accounts a ON a.id = r.account_id "
        "WHERE a.name = ? AND r.status = 'held'",
        account,
    )
    return {row[0] for row in rows}


async def _until_held(db: Path, account: str, count: int = 1) -> set[str]:
    async with asyncio.timeout(90):
        while True:
            # Polled: the holding happens in another process, with no event to await.
            if len(held := await _held(db, account)) >= count:
                return held
            await asyncio.sleep(0.01)


def _writable(db: Path) -> bool:
    with contextlib.closing(sqlite3.connect(db, timeout=0.2, isolation_level=None)) as conn:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:  # "database is locked"
            return False
        conn.execute("ROLLBACK")
        return True


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


async def _freeze_outside_a_write(db: Path, served: Served) -> None:
    """SIGSTOP a process, but not inside a write transaction.

    SQLite has one writer: a process frozen mid-transaction (a reservation, the
    request log, the reaper) would hold every other process's writes until thawed.
    """
    async with asyncio.timeout(60):
        while True:
            served.proc.send_signal(signal.SIGSTOP)
            if _state(served.proc.pid) != "T":  # the signal lands asynchronously
                await asyncio.sleep(0.001)
                continue
            if await asyncio.to_thread(_writable, db):
                return
            served.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.05)


async def _money(db: Path, account: str) -> tuple[int, int, int]:
    """(balance, ledger sum, credit minus the cost of what was delivered)."""
    ((balance, ledger, delivered),) = await asyncio.to_thread(
        _query,
        db,
        "SELECT a.balance_micros, "
        "(SELECT SUM(delta_micros) FROM ledger l WHERE l.account_id = a.id), "
        "(SELECT COALESCE(SUM(cost_micros), 0) FROM reservations r "
        " WHERE r.account_id = a.id AND r.status = 'settled') "
        "FROM accounts a WHERE a.name = ?",
        account,
    )
    return balance, ledger, CREDIT - delivered


@contextlib.asynccontextmanager
async def _calls(port: int, key: str, count: int) -> AsyncIterator[list[asyncio.Future[Any]]]:
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=message_size_options(64 * 1024 * 1024)
    )
    stub = images_pb2_grpc.ImageServiceStub(channel)
    metadata = [("authorization", f"Bearer {key}")]
    tasks = [
        asyncio.ensure_future(stub.GenerateImages(SLOW, metadata=metadata, timeout=60))
        for _ in range(count)
    ]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close()


async def _tenants(data_dir: Path, *names: str) -> list[str]:
    store = SqliteStore(data_dir / "imagegate.db")
    await store.open()
    found = []
    for name in names:
        await store.create_account(name, CREDIT)
        key = keys.new_key()
        await store.create_key(name, keys.hash_key(key), keys.display_prefix(key), "", None)
        found.append(key)
    await store.close()
    return found


async def test_kill_9_is_recovered_at_start_up_and_a_live_process_is_left_alone(
    tmp_path: Path,
) -> None:
    db = tmp_path / "imagegate.db"
    crashed_key, live_key = await _tenants(tmp_path, "crashed", "live")
    crashing, live = await _serve_grpc(tmp_path), await _serve_grpc(tmp_path)
    servers = [crashing, live]
    try:
        async with _calls(live.port, live_key, 2) as live_calls:
            # The live process holds money, then is frozen: alive, but neither
            # answering nor beating nor releasing anything while it is stopped.
            await _until_held(db, "live", 2)
            await _freeze_outside_a_write(db, live)
            live_held = await _held(db, "live")
            assert len(live_held) == 2

            async with _calls(crashing.port, crashed_key, 2):
                crashed_held = await _until_held(db, "crashed")
                crashing.proc.kill()  # SIGKILL: no clean-up code runs
                await crashing.proc.wait()
            assert await _held(db, "crashed") >= crashed_held  # nobody has freed them yet

            servers.append(await _serve_grpc(tmp_path))
            # The new process is serving: its start-up released the dead one's holds.
            assert await _held(db, "crashed") == set()
            balance, ledger, expected = await _money(db, "crashed")
            assert balance == ledger == expected
            assert await _held(db, "live") == live_held

            live.proc.send_signal(signal.SIGCONT)
            replies = await asyncio.gather(*live_calls)
        assert [len(r.data) for r in replies] == [4, 4]
        assert await _held(db, "live") == set()
        balance, ledger, expected = await _money(db, "live")
        assert balance == ledger == expected == CREDIT - 2 * 4 * 3000
    finally:
        for served in servers:
            await _end(served)


# The same rules on one store, each case in turn, on SQLite and on PostgreSQL.


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = store_for(database_url)
    await store.open(migrate=True)
    await store.create_account("a", CREDIT)
    yield store
    await store.close()


async def _hold(store: Store, owner: str | None) -> str:
    charge = Charge("r", "key", "local", 1, "256x256", "standard")
    far = 1_800_000_000.0 + 900
    return await store.reserve(1, 1000, charge, far, owner=owner)


def _exited_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


@pytest.mark.parametrize(
    ("case", "released"),
    [
        ("this process", False),
        ("another live instance in this process", False),
        ("another machine, fresh heartbeat", False),
        ("no owner recorded (an older version)", False),
        ("another machine, stale heartbeat", True),
        ("owner row gone (stopped cleanly)", True),
        ("this machine, pid gone", True),
        ("this machine, pid reused by a later process", True),
    ],
)
async def test_whose_reservations_are_released(store: Store, case: str, released: bool) -> None:
    clock = Clock()
    me = Liveness(store, stale_s=30, clock=clock)
    await me.beat()
    other = replace(me.instance, id="inst_other")
    owner: str | None = other.id
    if case == "this process":
        owner = me.owner
    elif case == "another live instance in this process":
        await store.beat(other)
    elif case == "another machine, fresh heartbeat":
        await store.beat(replace(other, host="elsewhere", heartbeat_at=clock.now - 29))
    elif case == "no owner recorded (an older version)":
        owner = None
    elif case == "another machine, stale heartbeat":
        await store.beat(replace(other, host="elsewhere", heartbeat_at=clock.now - 31))
    elif case == "this machine, pid gone":
        await store.beat(replace(other, pid=_exited_pid()))
    elif case == "this machine, pid reused by a later process":
        await store.beat(replace(other, pid_start=str(int(me.instance.pid_start) - 1)))
    await _hold(store, owner)
    await me.beat()
    account = await store.get_account("a")
    assert account is not None
    assert account.balance_micros == (CREDIT if released else CREDIT - 1000)
    assert await store.ledger_sum(account.id) == account.balance_micros
    row = next(u for u in await store.usage("a") if u.status in ("held", "released"))
    assert row.status == ("released" if released else "held")
    survivors = {i.id for i in await store.instances()}
    assert me.owner in survivors


async def test_a_clean_stop_leaves_nothing_to_wait_for(store: Store) -> None:
    first = Liveness(store, stale_s=30)
    await first.beat()
    await _hold(store, first.owner)
    await first.retire()
    second = Liveness(store, stale_s=30)
    assert await second.beat() == 1
    assert [i.id for i in await store.instances()] == [second.owner]
