"""Versioned migrations on both stores: fresh, legacy, concurrent, too new, not yet migrated."""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg
import pytest

from service.store import migrations
from service.store.base import SchemaOutdated, SchemaTooNew, StoreError
from service.store.sqlite import SqliteStore
from tests import pg
from tests.conftest import store_for

ALL = [m.name for m in migrations.migrations("sqlite")]

# The schema imagegate created before versioned migrations (service/store/sqlite.py,
# commit 8c897a8), frozen here: databases made by that code must keep working.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    balance_micros INTEGER NOT NULL CHECK (balance_micros >= 0),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    models TEXT,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    n INTEGER NOT NULL,
    size TEXT NOT NULL,
    quality TEXT NOT NULL,
    amount_micros INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('held', 'settled', 'released')),
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    resolved_at REAL
);
CREATE INDEX IF NOT EXISTS reservations_held ON reservations (status, expires_at);
CREATE INDEX IF NOT EXISTS reservations_account ON reservations (account_id, created_at);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    delta_micros INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('credit', 'reserve', 'refund')),
    reservation_id TEXT,
    note TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_account ON ledger (account_id);
"""


def test_both_dialects_have_the_same_migrations() -> None:
    assert ALL and ALL[0] == "0001_initial"
    assert [m.name for m in migrations.migrations("postgres")] == ALL
    assert migrations.latest("sqlite") == migrations.latest("postgres") == len(ALL)


async def test_fresh_database_is_migrated_once(database_url: str) -> None:
    store = store_for(database_url)
    assert await store.open(migrate=True) == ALL
    assert await store.schema_version() == len(ALL)
    await store.close()
    again = store_for(database_url)
    assert await again.open(migrate=True) == []
    await again.close()


async def test_sqlite_migrates_itself_on_open(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    assert await store.open() == ALL  # no migrate=True: `make run` needs no extra step
    await store.close()


async def test_postgres_refuses_an_unmigrated_schema(postgres_url: str) -> None:
    with pytest.raises(SchemaOutdated, match="run `imagegate migrate` first"):
        await store_for(postgres_url).open()
    store = store_for(postgres_url)
    assert await store.open(migrate=True) == ALL
    await store.close()
    plain = store_for(postgres_url)
    assert await plain.open() == []
    await plain.close()


async def test_a_newer_schema_is_refused(database_url: str) -> None:
    store = store_for(database_url)
    await store.open(migrate=True)
    await store.close()
    future = len(ALL) + 1
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as db:
            db.execute("INSERT INTO schema_version VALUES (?, 'from_the_future', 0)", (future,))
    else:
        await pg.execute(
            database_url,
            f"INSERT INTO schema_version VALUES ({future}, 'from_the_future', 0)",
        )
    for migrate in (False, True):
        with pytest.raises(SchemaTooNew, match=f"version {future}, newer than"):
            await store_for(database_url).open(migrate=migrate)


async def test_concurrent_migrations_apply_each_step_once(database_url: str) -> None:
    stores = [store_for(database_url) for _ in range(4)]
    results = await asyncio.gather(*(s.open(migrate=True) for s in stores))
    assert sorted(name for applied in results for name in applied) == ALL
    for store in stores:
        assert await store.schema_version() == len(ALL)
        await store.close()


async def test_database_made_before_versioned_migrations_is_version_1(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO accounts VALUES (1, 'acme', 4000, 1.0)")
        db.execute("INSERT INTO ledger VALUES (1, 1, 5000, 'credit', NULL, '', 1.0)")
        db.execute(
            "INSERT INTO reservations VALUES ('res_old', 1, 'key_1', 'req_1', 'local', 1, "
            "'256x256', 'standard', 1000, 0, 'held', 1.0, 99.0, NULL)"
        )
        db.execute("INSERT INTO ledger VALUES (2, 1, -1000, 'reserve', 'res_old', '', 1.0)")
        db.execute(
            "INSERT INTO api_keys VALUES ('key_1', 1, 'old', 'sk-ab...cd', ?, NULL, 1.0, NULL)",
            (b"h" * 32,),
        )

    store = SqliteStore(path)
    assert await store.open() == ALL[1:]  # version 1 is recognised, not re-applied
    try:
        assert await store.schema_version() == len(ALL)
        key = await store.find_key(b"h" * 32)
        assert key is not None and key.account_name == "acme"
        assert await store.release_expired(now=100.0) == 1  # the old hold is released
        account = await store.get_account("acme")
        assert account is not None and account.balance_micros == 5000
        assert await store.ledger_sum(account.id) == 5000
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version, name FROM schema_version").fetchall()[0] == (
            1,
            "0001_initial",
        )


async def test_both_stores_have_the_same_tables_and_columns(
    tmp_path: Path, postgres_url: str
) -> None:
    sqlite_store = SqliteStore(tmp_path / "db.sqlite")
    await sqlite_store.open()
    await sqlite_store.close()
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        lite = {(t, c[1]) for t in tables for c in db.execute(f"PRAGMA table_info({t})")}

    store = store_for(postgres_url)
    await store.open(migrate=True)
    await store.close()
    conn = await pg.connect(postgres_url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        )
    finally:
        await conn.close()
    # reservations.seq is PostgreSQL's stand-in for SQLite's implicit rowid.
    assert {(r["table_name"], r["column_name"]) for r in rows} - {("reservations", "seq")} == lite


async def test_a_schema_postgres_will_not_let_us_create_is_a_one_line_error(
    postgres_server: str, postgres_url: str
) -> None:
    schema = dict(parse_qsl(urlsplit(postgres_url).query))["search_path"]
    role = f"imagegate_test_ro_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        await pg.execute(
            postgres_server,
            f'CREATE ROLE "{role}" LOGIN; GRANT USAGE ON SCHEMA "{schema}" TO "{role}"',
        )
    except asyncpg.InsufficientPrivilegeError:
        pytest.skip("the test user may not create roles")
    try:
        parts = urlsplit(postgres_url)
        as_role = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
        with pytest.raises(StoreError, match="permission denied for schema") as raised:
            await store_for(as_role).open(migrate=True)
        assert "\n" not in str(raised.value)
    finally:
        await pg.execute(postgres_server, f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')
