"""Versioned migrations on both stores: fresh, legacy, concurrent, too new, not yet migrated."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg
import pytest

from service.store import migrations
from service.store.base import Charge, SchemaOutdated, SchemaTooNew, Served, StoreError
from service.store.sqlite import SqliteStore
from tests import pg
from tests.conftest import store_for

ALL = [m.name for m in migrations.migrations("sqlite")]
CHARGE = Charge("req_2", "key_1", "local", 1, "256x256", "standard")

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
        with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db, db:
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


# What later pre-versioning code added on open (commits d03a839 and e28c252).
OWNERS = """
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
ALTER TABLE reservations ADD COLUMN owner TEXT;
CREATE INDEX IF NOT EXISTS reservations_owner ON reservations (owner) WHERE status = 'held';
"""
ROUTES = """
ALTER TABLE reservations ADD COLUMN provider TEXT NOT NULL DEFAULT '';
ALTER TABLE reservations ADD COLUMN upstream_model TEXT NOT NULL DEFAULT '';
ALTER TABLE reservations ADD COLUMN upstream_cost_micros INTEGER NOT NULL DEFAULT 0;
"""


@pytest.mark.parametrize(
    "old_schema",
    [OLD_SCHEMA, OLD_SCHEMA + OWNERS, OLD_SCHEMA + OWNERS + ROUTES],
    ids=["first-release", "with-owners", "with-owners-and-routes"],
)
async def test_database_made_before_versioned_migrations_is_upgraded(
    tmp_path: Path, old_schema: str
) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(old_schema)
        db.execute(
            "INSERT INTO accounts (id, name, balance_micros, created_at) "
            "VALUES (1, 'acme', 4000, 1.0)"
        )
        db.execute(
            "INSERT INTO ledger (account_id, delta_micros, kind, created_at) "
            "VALUES (1, 5000, 'credit', 1.0)"
        )
        db.execute(
            "INSERT INTO reservations (id, account_id, key_id, request_id, model, n, size, "
            "quality, amount_micros, status, created_at, expires_at) VALUES ('res_old', 1, "
            "'key_1', 'req_1', 'local', 1, '256x256', 'standard', 1000, 'held', 1.0, 99.0)"
        )
        db.execute(
            "INSERT INTO ledger (account_id, delta_micros, kind, reservation_id, created_at) "
            "VALUES (1, -1000, 'reserve', 'res_old', 1.0)"
        )
        db.execute(
            "INSERT INTO api_keys VALUES ('key_1', 1, 'old', 'sk-ab...cd', ?, NULL, 1.0, NULL)",
            (b"h" * 32,),
        )

    store = SqliteStore(path)
    # Version 1 is recognised, not re-applied; later steps skip what is there already.
    assert await store.open() == ALL[1:]
    try:
        assert await store.schema_version() == len(ALL)
        key = await store.find_key(b"h" * 32)
        assert key is not None and key.account_name == "acme"
        assert await store.release_expired(now=100.0) == 1  # the old hold is released
        account = await store.get_account("acme")
        assert account is not None and account.balance_micros == 5000
        assert await store.ledger_sum(account.id) == 5000
        held = await store.reserve(account.id, 500, CHARGE, 1e12, owner="inst_x")
        await store.settle(held, 500, Served("local", "local", 0))
        assert (await store.usage("acme"))[0].provider == "local"
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        versions = db.execute("SELECT version, name FROM schema_version ORDER BY version")
        assert [name for _, name in versions] == ALL


async def test_a_failing_migration_step_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(OLD_SCHEMA)
        # Its last statement fails (the index name is taken by a table): migration 2
        # stops, and what its earlier statements did is rolled back with it.
        db.execute("CREATE TABLE reservations_owner (x)")
    with pytest.raises(sqlite3.OperationalError, match="already a table"):
        await SqliteStore(path).open()
    with contextlib.closing(sqlite3.connect(path)) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(reservations)")}
        assert "owner" not in columns
        # Not even the version-1 record of the same transaction is left.
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert not tables & {"instances", "schema_version"}


async def test_both_stores_have_the_same_tables_and_columns(
    tmp_path: Path, postgres_url: str
) -> None:
    sqlite_store = SqliteStore(tmp_path / "db.sqlite")
    await sqlite_store.open()
    await sqlite_store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite")) as db:
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


async def test_a_failing_postgres_migration_changes_nothing(postgres_url: str) -> None:
    await pg.execute(postgres_url, "CREATE TABLE ledger (x INTEGER)")  # 0001 creates it too
    with pytest.raises(StoreError, match='migration 0001_initial failed: relation "ledger"'):
        await store_for(postgres_url).open(migrate=True)
    conn = await pg.connect(postgres_url)
    try:
        # Tables, and the version table made in the same transaction: all rolled back.
        for table in ("accounts", "schema_version"):
            assert await conn.fetchval("SELECT to_regclass($1)", table) is None
    finally:
        await conn.close()
