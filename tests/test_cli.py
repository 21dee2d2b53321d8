"""The `imagegate` command as a user runs it: admin commands and `serve --demo`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc

from service.cli import main
from service.store import migrations
from service.store.base import Charge, Served
from tests import pg
from tests.conftest import store_for
from tests.rest import call

KEY_RE = re.compile(r"sk-[A-Za-z0-9_-]{43}")


def run(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_on(
    database_url: str, capsys: pytest.CaptureFixture[str] | None = None
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`imagegate ARGS --database-url URL`, as an operator of either store runs it:
    a process of its own, or with `capsys` main() in this one (quicker; an uncaught
    exception then fails the test)."""

    def run_command(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [*args, "--database-url", database_url]
        if capsys is not None:
            code = main(argv)
            out, err = capsys.readouterr()
            return subprocess.CompletedProcess(argv, code, out, err)
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run_command


def _one_line_error(result: subprocess.CompletedProcess[str], *phrases: str, code: int = 1) -> None:
    assert result.returncode == code, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("imagegate: "), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr


def test_accounts_credit_keys_usage(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_on(database_url, capsys)
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


def test_migrate_command(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_on(database_url, capsys)
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
        with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db, db:
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
    # Refused as a setting (exit 2), before any store is opened.
    _one_line_error(odd, "invalid setting database_url (--database-url (secret))", code=2)
    assert "a mysql URL" in odd.stderr
    assert "s3cret" not in odd.stderr


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def _serve(
    data_dir: Path, rest: int, grpc_port: int, *flags: str
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
        *flags,
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


async def test_serve_on_another_address_dials_and_links_it(tmp_path: Path) -> None:
    """--host: the front dials the service where it is bound, and image URLs for direct
    gRPC callers name the REST address actually served (not 127.0.0.1:8080)."""
    host = "127.0.0.2"  # loopback too, but not the address a guess would dial
    rest, grpc_port = _free_port(host), _free_port(host)
    proc, output = await _serve(tmp_path, rest, grpc_port, "--host", host)
    try:
        key = KEY_RE.search(output)
        assert key, output
        files = f"http://{host}:{rest}/v1/images/files/"
        reply = await call(
            "POST",
            f"http://{host}:{rest}/v1/images/generations",
            key=key.group(),
            json_body={"model": "local", "prompt": "hi", "size": "256x256"},
        )
        assert reply.status == 200, reply.body
        assert reply.json()["data"][0]["url"].startswith(files)
        async with grpc.aio.insecure_channel(f"{host}:{grpc_port}") as channel:
            direct = await images_pb2_grpc.ImageServiceStub(channel).GenerateImages(
                images_pb2.GenerateImagesRequest(model="local", prompt="hi", size="256x256"),
                metadata=[("authorization", f"Bearer {key.group()}")],
            )
        assert direct.data[0].url.startswith(files)
        assert (await call("GET", direct.data[0].url)).status == 200
    finally:
        assert await _stop(proc) == 0


BAD_AMOUNTS = [
    "-5",
    "-0.000001",
    "abc",
    "",
    "NaN",
    "-nan",
    "sNaN",
    "Infinity",
    "-Infinity",
    "inf",
    "1e400",
    "1e999999999",
    "1e-400",
    "0x10",
    "1.0000001",
    "1000000.000001",  # a micro-USD over the cap of $1,000,000 per credit
    "9223372036854775807",
    "1" * 60,
]


def _admin(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the CLI in this process: an uncaught exception would fail the test."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def _db_rows(data_dir: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(data_dir / "imagegate.db") as db:
        return db.execute(
            "SELECT name, balance_micros, typeof(balance_micros), "
            "(SELECT GROUP_CONCAT(DISTINCT typeof(delta_micros)) FROM ledger l "
            " WHERE l.account_id = a.id), "
            "(SELECT SUM(delta_micros) FROM ledger l WHERE l.account_id = a.id) "
            "FROM accounts a ORDER BY name"
        ).fetchall()


def test_bad_amounts_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path)
    assert _admin(capsys, "accounts", "create", "--data-dir", d, "--credit=2.5", "acme")[0] == 0
    for amount in BAD_AMOUNTS:
        for argv in (
            ("credit", "add", "--data-dir", d, "--", "acme", amount),
            ("accounts", "create", "--data-dir", d, f"--credit={amount}", "other"),
        ):
            code, err = _admin(capsys, *argv)
            assert code == 1, (argv, err)
            assert err.startswith("imagegate: ") and err.count("\n") == 1, (argv, err)
            assert "Traceback" not in err
    assert _admin(capsys, "credit", "add", "--data-dir", d, "acme", "0")[0] == 1
    assert _db_rows(tmp_path) == [("acme", 2_500_000, "integer", "integer", 2_500_000)]


def test_a_balance_cannot_outgrow_its_integer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path)
    assert _admin(capsys, "accounts", "create", "--data-dir", d, "--credit=1000000", "rich")[0] == 0
    for _ in range(3):
        assert _admin(capsys, "credit", "add", "--data-dir", d, "rich", "1000000")[0] == 0
    with sqlite3.connect(tmp_path / "imagegate.db") as db:
        # As if topped up a thousand times: the balance sits just under its cap.
        top = 10**15 - 4 * 10**12 - 1
        db.execute("UPDATE accounts SET balance_micros = balance_micros + ?", (top,))
        db.execute(
            "INSERT INTO ledger (account_id, delta_micros, kind, created_at) "
            "VALUES (1, ?, 'credit', 0)",
            (top,),
        )
    code, err = _admin(capsys, "credit", "add", "--data-dir", d, "rich", "0.000002")
    assert code == 1 and "over $1000000000.00" in err and err.count("\n") == 1
    assert _admin(capsys, "credit", "add", "--data-dir", d, "rich", "0.000001")[0] == 0
    assert _db_rows(tmp_path) == [("rich", 10**15, "integer", "integer", 10**15)]


MODELS_CATALOG = """
[providers.mine]
kind = "local"

[models.mine]
routes = [
  { provider = "openai", upstream_model = "dall-e-3" },
  { provider = "mine", upstream_model = "local" },
]
sizes = ["256x256"]
default_size = "256x256"
qualities = ["standard"]
default_quality = "standard"

[models.mine.prices.standard]
"256x256" = 1500
"""

CREDENTIAL_VARS = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "GEMINI_API_KEY", "BFL_API_KEY")


def test_models_shows_every_route_and_what_is_missing(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(MODELS_CATALOG)
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
    command = [sys.executable, "-m", "service.cli", "models", "--catalog", str(catalog)]
    result = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    models = {m["id"]: m for m in json.loads(result.stdout)}
    mine = models["mine"]
    assert mine["served"] and mine["prices_micros"] == {"standard/256x256": 1500}
    openai_route, mine_route = mine["routes"]
    assert (openai_route["provider"], openai_route["kind"], openai_route["live"]) == (
        "openai",
        "openai",
        False,
    )
    assert openai_route["missing"]  # the variable, or the adapter not in this build
    assert (mine_route["provider"], mine_route["live"], mine_route["missing"]) == ("mine", True, "")
    # Every shipped model is listed, served or not, with its prices.
    assert models["imagen-3"]["served"] is False and models["imagen-3"]["family"] == "imagen"
    assert "per 1M" in models["gpt-image-1"]["prices"]
    text = subprocess.run(command, capture_output=True, text=True, env=env).stdout
    assert "mine  [-]  served  $0.0015 per image" in text
    assert "    mine/local (local): live" in text
    assert "    openai/dall-e-3 (openai): not live: " in text


def test_models_refuses_a_bad_catalog_in_one_line(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(MODELS_CATALOG.replace('provider = "mine"', 'provider = "nope"'))
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "models", "--catalog", str(catalog)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "provider 'nope', which is not declared" in result.stderr


async def test_usage_shows_the_route_and_upstream_cost(database_url: str) -> None:
    run = run_on(database_url)
    assert (await asyncio.to_thread(run, "migrate")).returncode == 0
    assert (
        await asyncio.to_thread(run, "accounts", "create", "acme", "--credit", "1")
    ).returncode == 0
    store = store_for(database_url)
    await store.open()
    account = await store.get_account("acme")
    assert account is not None
    charge = Charge("req-9", "key_x", "dall-e-3", 1, "1024x1024", "standard")
    reservation = await store.reserve(account.id, 40000, charge, time.time() + 60)
    await store.settle(reservation, 40000, Served("openai", "dall-e-3", 38000))
    await store.close()
    result = await asyncio.to_thread(run, "usage", "acme")
    line = result.stdout.splitlines()[1]
    assert "$0.04" in line and "$0.038" in line and "openai/dall-e-3" in line
    rows = json.loads((await asyncio.to_thread(run, "usage", "acme", "--json")).stdout)
    assert rows[0]["provider"] == "openai" and rows[0]["upstream_cost_micros"] == 38000


def test_sqlite_needs_no_postgres_driver(tmp_path: Path) -> None:
    """Without asyncpg (no `postgres` extra) SQLite works, and a postgresql:// URL says why not."""
    script = f"""
import sys
sys.modules["asyncpg"] = None  # as if not installed: importing it raises ImportError
from service.cli import main
assert main(["accounts", "create", "x", "--credit", "1", "--data-dir", {str(tmp_path)!r}]) == 0
assert main(["accounts", "show", "x", "--database-url", "postgresql://u@127.0.0.1/db"]) == 1
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "imagegate: a postgresql:// database needs asyncpg: pip install 'imagegate[postgres]'\n"
    )


def test_key_limits_commands(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_on(database_url, capsys)
    assert run("migrate").returncode == 0
    assert run("accounts", "create", "acme").returncode == 0
    created = run("keys", "create", "acme", "--rpm", "60", "--max-n", "2", "--concurrency", "0")
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.split()[1]
    listed = run("keys", "list", "acme").stdout
    assert "rpm=60 ipm=default concurrency=none max_n=2" in listed
    changed = run("keys", "limits", key_id, "--rpm", "default", "--ipm", "100")
    assert changed.returncode == 0
    assert changed.stdout.strip() == f"{key_id}: rpm=default ipm=100 concurrency=none max_n=2"
    # No flags: shown as they are.
    assert run("keys", "limits", key_id).stdout == changed.stdout
    missing = run("keys", "limits", "key_missing", "--rpm", "1")
    assert missing.returncode == 1 and "no key key_missing" in missing.stderr
    with pytest.raises(SystemExit):  # argparse refuses it: not a count
        run("keys", "limits", key_id, "--rpm", "-3")
    assert "not a whole number or 'default'" in capsys.readouterr().err
