"""The `imagegate` command as a user runs it: admin commands and `serve --demo`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from service.store import migrations
from tests import pg
from tests.rest import call

KEY_RE = re.compile(r"sk-[A-Za-z0-9_-]{43}")


def run(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_on(database_url: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`imagegate ARGS --database-url URL`, as an operator of either store runs it."""

    def run_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args, "--database-url", database_url],
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run_command


def _one_line_error(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("imagegate: "), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


def test_accounts_credit_keys_usage(database_url: str) -> None:
    run = run_on(database_url)
    assert run("migrate").returncode == 0
    assert run("accounts", "create", "acme", "--credit", "2.5").returncode == 0
    dup = run("accounts", "create", "acme")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert run("credit", "add", "acme", "0.75").returncode == 0
    shown = json.loads(run("accounts", "show", "acme", "--json").stdout)
    assert shown["balance_micros"] == 3_250_000 == shown["ledger_sum_micros"]
    assert shown["balance_usd"] == "$3.25"

    created = run("keys", "create", "acme", "--models", "local", "--name", "ci")
    assert created.returncode == 0
    key = KEY_RE.search(created.stdout)
    key_id = re.search(r"key_[0-9a-f]{16}", created.stdout)
    assert key and key_id
    listed = run("keys", "list", "acme").stdout
    assert key_id.group() in listed and "active" in listed and "local" in listed
    assert key.group() not in listed
    assert run("keys", "revoke", key_id.group()).returncode == 0
    assert "revoked" in run("keys", "list", "acme").stdout
    assert run("keys", "revoke", key_id.group()).returncode == 1

    assert run("usage", "acme", "--json").stdout.strip() == "[]"
    assert "no account" in run("usage", "nobody").stderr
    missing = run("accounts", "show", "nobody")
    assert missing.returncode == 1 and "no account" in missing.stderr
    bad = run("credit", "add", "acme", "0.0000001")
    assert bad.returncode == 1 and "micro-USD" in bad.stderr


def test_data_dir_holds_the_default_database(tmp_path: Path) -> None:
    assert run(tmp_path, "accounts", "create", "acme", "--credit", "1").returncode == 0
    assert (tmp_path / "imagegate.db").exists()
    assert "$1.00" in run(tmp_path, "accounts", "show", "acme").stdout


def test_migrate_command(database_url: str) -> None:
    run = run_on(database_url)
    if database_url.startswith("postgresql://"):
        # PostgreSQL is shared by replicas: its schema changes only when an operator says so.
        _one_line_error(run("accounts", "show", "acme"), "run `imagegate migrate` first")
    first = run("migrate")
    assert first.returncode == 0, first.stderr
    names = [m.name for m in migrations.migrations("sqlite")]
    assert first.stdout.splitlines() == [
        *(f"applied {name}" for name in names),
        f"schema at version {len(names)}",
    ]
    again = run("migrate")
    assert again.stdout.strip() == f"schema at version {len(names)}, up to date"
    _one_line_error(run("accounts", "show", "acme"), "no account named 'acme'")


async def test_a_newer_schema_stops_every_command(database_url: str, tmp_path: Path) -> None:
    run = run_on(database_url)
    assert run("migrate").returncode == 0
    future = migrations.latest("sqlite") + 1
    sql = f"INSERT INTO schema_version VALUES ({future}, 'from_the_future', 0)"
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as db:
            db.execute(sql)
    else:
        await pg.execute(database_url, sql)
    for args in (
        ("migrate",),
        ("accounts", "create", "acme"),
        ("serve-grpc", "--grpc-port", "0", "--data-dir", str(tmp_path)),
    ):
        _one_line_error(run(*args), f"schema is at version {future}, newer than")


def test_a_password_in_the_url_is_never_printed() -> None:
    result = run_on("postgresql://someone:s3cret-pw@127.0.0.1:1/nowhere")("accounts", "show", "x")
    _one_line_error(result, "cannot connect to PostgreSQL at 127.0.0.1:1/nowhere")
    assert "s3cret" not in result.stderr
    odd = run_on("mysql://someone:s3cret-pw@host/db")("accounts", "show", "x")
    _one_line_error(odd, "unsupported database URL scheme 'mysql'")
    assert "s3cret" not in odd.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(
    data_dir: Path, rest: int, grpc_port: int
) -> tuple[asyncio.subprocess.Process, str]:
    """Start `imagegate serve --demo` and return it with its output up to "ready"."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--demo",
        "--data-dir",
        str(data_dir),
        "--rest-port",
        str(rest),
        "--grpc-port",
        str(grpc_port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout
    output = ""
    try:
        async with asyncio.timeout(30):
            while "Ctrl-C stops" not in output:
                line = await proc.stdout.readline()
                assert line, f"serve exited early:\n{output}"
                output += line.decode()
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, output


async def _stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 15)


async def test_serve_demo_prints_a_working_key(tmp_path: Path) -> None:
    rest, grpc_port = _free_port(), _free_port()
    proc, output = await _serve(tmp_path, rest, grpc_port)
    try:
        key = KEY_RE.search(output)
        assert key, output
        assert f"curl http://127.0.0.1:{rest}/v1/images/generations" in output
        reply = await call(
            "POST",
            f"http://127.0.0.1:{rest}/v1/images/generations",
            key=key.group(),
            json_body={"model": "local", "prompt": "hi", "size": "256x256"},
        )
        assert reply.status == 200, reply.body
        url = reply.json()["data"][0]["url"]
        assert url.startswith(f"http://127.0.0.1:{rest}/v1/images/files/")
        assert (await call("GET", url)).status == 200
    finally:
        assert await _stop(proc) == 0
    # A second start finds the demo account and does not mint credentials again.
    second, output = await _serve(tmp_path, rest, grpc_port)
    await _stop(second)
    assert "exists already" in output and not KEY_RE.search(output)


async def test_serve_on_a_busy_port_says_so(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--data-dir",
                str(tmp_path),
                "--rest-port",
                str(port),
                "--grpc-port",
                str(_free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "imagegate:" in result.stderr and "Traceback" not in result.stderr
