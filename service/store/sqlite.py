"""The embedded store: SQLite in WAL mode, each operation one transaction on one DB thread.

Why not a driver that awaits each statement: every await is a thread hop
(~0.25 ms measured with aiosqlite), and a transaction of five statements held
a lock across five hops, capping the gateway at a few hundred requests a
second. Here a whole transaction runs in one hop on a dedicated thread, which
also serialises writers without an asyncio lock; the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from service import metrics
from service.errors import InsufficientBalance
from service.money import MAX_BALANCE_MICROS, check_credit, format_usd
from service.private import private_dir, touch_private
from service.store import migrations, sqlite_checkpoint
from service.store.base import (
    LIMIT_FIELDS,
    Account,
    AccountBalance,
    AccountExists,
    AccountSummary,
    AccountUsageRow,
    AdminKeyRecord,
    Charge,
    Claim,
    IdempotencyRecord,
    Instance,
    KeyLimits,
    KeyRecord,
    LedgerRow,
    Served,
    UnknownAccount,
    UnknownCursor,
    UsageBucketRow,
    UsageRow,
    key_changes,
    new_admin_key_id,
    new_key_id,
    new_reservation_id,
)

T = TypeVar("T")

# Migrations 2 and 3 (owners, routes) were, before versioned migrations, columns that
# the store added on open where missing: an old database may have some of them.
_ADDED_BEFORE_VERSIONS = 3

_KEY_SELECT = (
    "SELECT k.id, k.account_id, a.name, k.name, k.prefix, k.key_hash, k.models, k.created_at, "
    "k.revoked_at, k.rpm, k.ipm, k.concurrency, k.max_n "
    "FROM api_keys k JOIN accounts a ON a.id = k.account_id "
)
_USAGE_COLUMNS = (
    "SELECT r.created_at, r.request_id, r.model, r.n, r.size, r.quality, "
    "r.amount_micros, r.cost_micros, r.status, r.provider, r.upstream_model, "
    "r.upstream_cost_micros, r.id, r.key_id, "
    "CAST(ROUND((r.resolved_at - r.created_at) * 1000) AS INTEGER)"
)
_USAGE_SELECT = _USAGE_COLUMNS + " FROM reservations r "
_ADMIN_KEY_SELECT = "SELECT id, name, prefix, key_hash, created_at, revoked_at FROM admin_keys "
_IDEMPOTENCY_SELECT = (
    "SELECT request_hash, status, response, error, locked_until FROM idempotency_keys "
    "WHERE account_id = ? AND key = ?"
)


class SqliteStore:
    def __init__(
        self,
        path: Path,
        clock: Callable[[], float] = time.time,
        checkpoint_interval_s: float = sqlite_checkpoint.INTERVAL_S,
    ) -> None:
        self._path = path
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        # One thread owns the connection: sqlite3 objects must stay on their thread.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagegate-sqlite")
        self._checkpoints = sqlite_checkpoint.Checkpointer(path, checkpoint_interval_s)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, partial(fn, *args))

    async def open(self, *, migrate: bool = False) -> list[str]:
        # The embedded default migrates itself whatever `migrate` says: `make run`
        # on a database made by an older imagegate needs no extra step.
        return await self._run(self._open)

    def _open(self) -> list[str]:
        private_dir(self._path.parent)
        # Created 0600 before SQLite opens it: SQLite gives -wal and -shm the same mode.
        touch_private(self._path)
        # Autocommit mode; transactions are explicit BEGIN IMMEDIATE ... COMMIT below.
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            # The CLI may write while the server runs: wait for its lock, don't fail.
            db.execute("PRAGMA busy_timeout=5000")
            _when_unlocked(lambda: db.execute("PRAGMA journal_mode=WAL"))
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            # Checkpoints (which sync to disk) run on their own thread, never in a
            # request's commit (sqlite_checkpoint.py).
            db.execute("PRAGMA wal_autocheckpoint=0")
            applied = _migrate(db, self._clock())
        except BaseException:
            db.close()
            raise
        self._db = db
        self._checkpoints.start()
        return applied

    async def schema_version(self) -> int:
        rows = await self._read("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        return int(rows[0][0])

    async def close(self) -> None:
        await asyncio.to_thread(self._checkpoints.stop)
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)

    async def _tx(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(db, *args) as one transaction on the DB thread."""
        return await self._run(self._in_tx, fn, *args)

    def _in_tx(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._db is not None, "store not opened"
        result = _transaction(self._db, fn, *args)
        self._checkpoints.dirty = True
        return result

    async def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        def query() -> list[Any]:
            assert self._db is not None, "store not opened"
            return self._db.execute(sql, args).fetchall()

        return await self._run(query)

    # Accounts

    async def create_account(self, name: str, credit_micros: int = 0) -> Account:
        check_credit(credit_micros)
        await self._tx(self._create_account, name, credit_micros, self._clock())
        return await self._account(name)

    def _create_account(self, db: sqlite3.Connection, name: str, micros: int, now: float) -> None:
        if db.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
            raise AccountExists(f"account {name!r} already exists")
        cur = db.execute(
            "INSERT INTO accounts (name, balance_micros, created_at) VALUES (?, 0, ?)", (name, now)
        )
        if micros:
            _credit(db, cur.lastrowid, micros, "initial credit", now)

    async def get_account(self, name: str) -> Account | None:
        rows = await self._read(
            "SELECT id, name, balance_micros, created_at FROM accounts WHERE name = ?", (name,)
        )
        return Account(*rows[0]) if rows else None

    async def _account(self, name: str) -> Account:
        account = await self.get_account(name)
        if account is None:
            raise UnknownAccount(f"no account named {name!r}")
        return account

    async def add_credit(self, name: str, micros: int, note: str = "") -> Account:
        check_credit(micros)

        def add(db: sqlite3.Connection) -> None:
            _credit(db, _account_id(db, name), micros, note, self._clock())

        await self._tx(add)
        return await self._account(name)

    # Keys

    async def create_key(
        self,
        account_name: str,
        key_hash: bytes,
        prefix: str,
        name: str,
        models: tuple[str, ...] | None,
        limits: KeyLimits | None = None,
    ) -> KeyRecord:
        key_id = new_key_id()
        limits = limits or KeyLimits()
        models_json = None if models is None else json.dumps(list(models))

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, models, "
                "created_at, rpm, ipm, concurrency, max_n) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    _account_id(db, account_name),
                    name,
                    prefix,
                    key_hash,
                    models_json,
                    self._clock(),
                    *(getattr(limits, f) for f in LIMIT_FIELDS),
                ),
            )

        await self._tx(insert)
        (record,) = await self._keys("WHERE k.id = ?", (key_id,))
        return record

    async def find_key(self, key_hash: bytes) -> KeyRecord | None:
        records = await self._keys("WHERE k.key_hash = ?", (key_hash,))
        return records[0] if records else None

    async def list_keys(self, account_name: str) -> list[KeyRecord]:
        return await self._keys("WHERE a.name = ? ORDER BY k.created_at", (account_name,))

    async def _keys(self, where: str, args: tuple[Any, ...]) -> list[KeyRecord]:
        return [_key_record(row) for row in await self._read(_KEY_SELECT + where, args)]

    async def revoke_key(self, key_id: str) -> bool:
        def revoke(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self._clock(), key_id),
            )
            return cur.rowcount == 1

        return await self._tx(revoke)

    # Money

    async def reserve(
        self,
        account_id: int,
        amount: int,
        charge: Charge,
        expires_at: float,
        *,
        reservation_id: str | None = None,
        owner: str | None = None,
    ) -> str:
        reservation_id = reservation_id or new_reservation_id()
        now = self._clock()

        def reserve(db: sqlite3.Connection) -> None:
            # Check and debit in one statement: parallel requests cannot all pass the check.
            cur = db.execute(
                "UPDATE accounts SET balance_micros = balance_micros - ? "
                "WHERE id = ? AND balance_micros >= ?",
                (amount, account_id, amount),
            )
            if cur.rowcount != 1:
                row = db.execute(
                    "SELECT balance_micros FROM accounts WHERE id = ?", (account_id,)
                ).fetchone()
                raise InsufficientBalance(
                    f"Your balance of {format_usd(row[0] if row else 0)} is too low for this "
                    f"request, quoted at {format_usd(amount)}. Add credit to continue."
                )
            db.execute(
                "INSERT INTO reservations (id, account_id, key_id, request_id, model, n, size, "
                "quality, amount_micros, status, created_at, expires_at, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'held', ?, ?, ?)",
                (
                    reservation_id,
                    account_id,
                    charge.key_id,
                    charge.request_id,
                    charge.model,
                    charge.n,
                    charge.size,
                    charge.quality,
                    amount,
                    now,
                    expires_at,
                    owner,
                ),
            )
            db.execute(
                "INSERT INTO ledger (account_id, delta_micros, kind, reservation_id, created_at) "
                "VALUES (?, ?, 'reserve', ?, ?)",
                (account_id, -amount, reservation_id, now),
            )

        await self._tx(reserve)
        metrics.reserved(charge.model, amount)
        return reservation_id

    async def settle(
        self,
        reservation_id: str,
        cost: int,
        served: Served | None = None,
        *,
        done: tuple[Claim, bytes] | None = None,
    ) -> None:
        def settle(db: sqlite3.Connection) -> Resolved | None:
            resolved = _resolve(db, reservation_id, "settled", cost, self._clock(), served)
            if done is not None:
                _finish(db, done[0], done[1], None)
            return resolved

        _counted([await self._tx(settle)])

    async def release(self, reservation_id: str) -> None:
        _counted([await self._tx(_resolve, reservation_id, "released", 0, self._clock())])

    async def release_expired(self, now: float) -> int:
        def release_all(db: sqlite3.Connection) -> list[Resolved | None]:
            expired = db.execute(
                "SELECT id FROM reservations WHERE status = 'held' AND expires_at < ?", (now,)
            ).fetchall()
            return [
                _resolve(db, reservation_id, "released", 0, now) for (reservation_id,) in expired
            ]

        return _counted(await self._tx(release_all))

    # Instances

    async def beat(self, instance: Instance) -> None:
        def upsert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO instances (id, host, pid, pid_start, started_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (
                    instance.id,
                    instance.host,
                    instance.pid,
                    instance.pid_start,
                    instance.started_at,
                    instance.heartbeat_at,
                ),
            )

        await self._tx(upsert)

    async def instances(self) -> list[Instance]:
        rows = await self._read(
            "SELECT id, host, pid, pid_start, started_at, heartbeat_at FROM instances"
        )
        return [Instance(*row) for row in rows]

    async def release_orphans(self, dead: list[str], stale_before: float, keep: str) -> int:
        def release(db: sqlite3.Connection) -> list[Resolved | None]:
            db.executemany("DELETE FROM instances WHERE id = ?", [(i,) for i in dead if i != keep])
            db.execute(
                "DELETE FROM instances WHERE heartbeat_at < ? AND id != ?", (stale_before, keep)
            )
            orphans = db.execute(
                "SELECT id FROM reservations WHERE status = 'held' AND owner IS NOT NULL "
                "AND owner NOT IN (SELECT id FROM instances)"
            ).fetchall()
            now = self._clock()
            return [
                _resolve(db, reservation_id, "released", 0, now) for (reservation_id,) in orphans
            ]

        return _counted(await self._tx(release))

    async def retire(self, instance_id: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))

        await self._tx(delete)

    async def ledger_sum(self, account_id: int) -> int:
        rows = await self._read(
            "SELECT COALESCE(SUM(delta_micros), 0) FROM ledger WHERE account_id = ?", (account_id,)
        )
        return int(rows[0][0])

    async def held(self) -> tuple[int, float | None]:
        # The reservations_held index (status, expires_at) answers it without a table scan.
        rows = await self._read(
            "SELECT COUNT(*), MIN(created_at) FROM reservations WHERE status = 'held'"
        )
        count, oldest = rows[0]
        return int(count), oldest

    async def usage(
        self, account_name: str, limit: int = 20, after: str | None = None
    ) -> list[UsageRow]:
        where = "WHERE r.account_id = (SELECT id FROM accounts WHERE name = ?)"
        args: list[Any] = [account_name]
        if after is not None:
            cursor = await self._read(
                "SELECT r.created_at, r.rowid FROM reservations r JOIN accounts a "
                "ON a.id = r.account_id WHERE a.name = ? AND r.id = ?",
                (account_name, after),
            )
            if not cursor:
                raise UnknownCursor(f"no usage record {after!r} in account {account_name!r}")
            where += " AND (r.created_at, r.rowid) < (?, ?)"
            args += cursor[0]
        rows = await self._read(
            f"{_USAGE_SELECT}{where} ORDER BY r.created_at DESC, r.rowid DESC LIMIT ?",
            (*args, limit),
        )
        return [UsageRow(*row) for row in rows]

    async def balance(self, account_id: int) -> AccountBalance:
        rows = await self._read(
            "SELECT a.balance_micros, (SELECT COALESCE(SUM(amount_micros), 0) FROM reservations "
            "WHERE account_id = a.id AND status = 'held') FROM accounts a WHERE a.id = ?",
            (account_id,),
        )
        if not rows:
            raise UnknownAccount(f"no account with id {account_id}")
        return AccountBalance(int(rows[0][0]), int(rows[0][1]))

    # The admin API

    async def list_accounts(self) -> list[AccountSummary]:
        rows = await self._read(
            "SELECT a.id, a.name, a.balance_micros, (SELECT COALESCE(SUM(amount_micros), 0) "
            "FROM reservations WHERE account_id = a.id AND status = 'held'), a.created_at "
            "FROM accounts a ORDER BY a.name"
        )
        return [AccountSummary(*row) for row in rows]

    async def ledger(self, account_id: int, limit: int = 100) -> list[LedgerRow]:
        # The running balance over the whole ledger, then the newest `limit` of it.
        rows = await self._read(
            "SELECT * FROM (SELECT l.id, l.created_at, l.kind, l.delta_micros, "
            "SUM(l.delta_micros) OVER (ORDER BY l.id), COALESCE(r.request_id, ''), l.note "
            "FROM ledger l LEFT JOIN reservations r ON r.id = l.reservation_id "
            "WHERE l.account_id = ?) ORDER BY 1 DESC LIMIT ?",
            (account_id, limit),
        )
        return [LedgerRow(*row) for row in rows]

    async def get_key(self, key_id: str) -> KeyRecord | None:
        records = await self._keys("WHERE k.id = ?", (key_id,))
        return records[0] if records else None

    async def all_keys(self) -> list[KeyRecord]:
        return await self._keys("ORDER BY a.name, k.created_at", ())

    async def update_key(
        self,
        key_id: str,
        limits: dict[str, int | None],
        models: tuple[str, ...] | None = None,
        *,
        set_models: bool = False,
    ) -> KeyRecord | None:
        # Column names come from LIMIT_FIELDS only (checked there), never from input.
        changes = key_changes(limits, models, set_models)
        if changes:
            assignments = ", ".join(f"{name} = ?" for name in changes)

            def update(db: sqlite3.Connection) -> None:
                db.execute(
                    f"UPDATE api_keys SET {assignments} WHERE id = ?", (*changes.values(), key_id)
                )

            await self._tx(update)
        return await self.get_key(key_id)

    async def keys_last_used(self, key_ids: list[str]) -> dict[str, float]:
        if not key_ids:
            return {}
        marks = ", ".join("?" * len(key_ids))
        rows = await self._read(
            f"SELECT key_id, MAX(created_at) FROM reservations WHERE key_id IN ({marks}) "
            "GROUP BY key_id",
            tuple(key_ids),
        )
        return {key_id: float(last) for key_id, last in rows}

    async def usage_by_day(self, account_name: str | None, since: float) -> list[UsageBucketRow]:
        where = "WHERE r.created_at >= ?"
        args: list[Any] = [since]
        if account_name is not None:
            where += " AND r.account_id = (SELECT id FROM accounts WHERE name = ?)"
            args.append(account_name)
        rows = await self._read(
            "SELECT strftime('%Y-%m-%d', r.created_at, 'unixepoch') AS day, r.model, r.key_id, "
            "r.provider, r.upstream_model, COUNT(*), "
            "SUM(CASE WHEN r.status = 'settled' THEN r.n ELSE 0 END), SUM(r.cost_micros) "
            f"FROM reservations r {where} "
            "GROUP BY day, r.model, r.key_id, r.provider, r.upstream_model "
            "ORDER BY day, r.model, r.key_id, r.provider, r.upstream_model",
            tuple(args),
        )
        return [UsageBucketRow(*row) for row in rows]

    async def recent_usage(
        self, account_name: str | None, limit: int = 20, after: str | None = None
    ) -> list[AccountUsageRow]:
        conditions: list[str] = []
        args: list[Any] = []
        if account_name is not None:
            conditions.append("a.name = ?")
            args.append(account_name)
        if after is not None:
            cursor = await self._read(
                "SELECT r.created_at, r.rowid FROM reservations r JOIN accounts a "
                "ON a.id = r.account_id WHERE r.id = ?"
                + (" AND a.name = ?" if account_name is not None else ""),
                (after, *args),
            )
            if not cursor:
                raise UnknownCursor(f"no usage record {after!r}")
            conditions.append("(r.created_at, r.rowid) < (?, ?)")
            args += cursor[0]
        where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
        rows = await self._read(
            f"{_USAGE_COLUMNS}, a.name FROM reservations r "
            f"JOIN accounts a ON a.id = r.account_id {where} "
            "ORDER BY r.created_at DESC, r.rowid DESC LIMIT ?",
            (*args, limit),
        )
        return [AccountUsageRow(row[-1], UsageRow(*row[:-1])) for row in rows]

    async def create_admin_key(self, key_hash: bytes, prefix: str, name: str) -> AdminKeyRecord:
        record = AdminKeyRecord(new_admin_key_id(), name, prefix, key_hash, self._clock(), None)

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO admin_keys (id, name, prefix, key_hash, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (record.id, name, prefix, key_hash, record.created_at),
            )

        await self._tx(insert)
        return record

    async def find_admin_key(self, key_hash: bytes) -> AdminKeyRecord | None:
        rows = await self._read(_ADMIN_KEY_SELECT + "WHERE key_hash = ?", (key_hash,))
        return _admin_key(rows[0]) if rows else None

    async def list_admin_keys(self) -> list[AdminKeyRecord]:
        rows = await self._read(_ADMIN_KEY_SELECT + "ORDER BY created_at, id")
        return [_admin_key(row) for row in rows]

    async def revoke_admin_key(self, key_id: str) -> bool:
        def revoke(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE admin_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self._clock(), key_id),
            )
            return cur.rowcount == 1

        return await self._tx(revoke)

    # Idempotency keys

    async def claim_idempotency(
        self,
        account_id: int,
        key: str,
        request_hash: bytes,
        locked_until: float,
        token: str,
        owner: str | None = None,
    ) -> IdempotencyRecord | None:
        now = self._clock()

        def claim(db: sqlite3.Connection) -> IdempotencyRecord | None:
            cur = db.execute(
                "INSERT INTO idempotency_keys (account_id, key, request_hash, status, token, "
                "owner, created_at, locked_until) VALUES (?, ?, ?, 'running', ?, ?, ?, ?) "
                "ON CONFLICT (account_id, key) DO UPDATE SET token = excluded.token, "
                "owner = excluded.owner, locked_until = excluded.locked_until "
                "WHERE status = 'running' AND request_hash = excluded.request_hash AND "
                "(locked_until < ? OR (owner IS NOT NULL AND owner NOT IN "
                "(SELECT id FROM instances)))",
                (account_id, key, request_hash, token, owner, now, locked_until, now),
            )
            if cur.rowcount == 1:
                return None
            return _idempotency_record(db.execute(_IDEMPOTENCY_SELECT, (account_id, key)))

        return await self._tx(claim)

    async def get_idempotency(self, account_id: int, key: str) -> IdempotencyRecord | None:
        def get() -> IdempotencyRecord | None:
            assert self._db is not None, "store not opened"
            return _idempotency_record(self._db.execute(_IDEMPOTENCY_SELECT, (account_id, key)))

        return await self._run(get)

    async def finish_idempotency(
        self, claim: Claim, response: bytes | None, error: str | None
    ) -> None:
        await self._tx(_finish, claim, response, error)

    async def abandon_idempotency(self, claim: Claim) -> None:
        def delete(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM idempotency_keys WHERE account_id = ? AND key = ? AND token = ? "
                "AND status = 'running'",
                (claim.account_id, claim.key, claim.token),
            )

        await self._tx(delete)

    async def sweep_idempotency(self, created_before: float) -> int:
        def delete(db: sqlite3.Connection) -> int:
            cur = db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (created_before,))
            return cur.rowcount

        return await self._tx(delete)


def _transaction(db: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    """fn(db, *args) in one BEGIN IMMEDIATE transaction: the write lock from the start."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db, *args)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def _migrate(db: sqlite3.Connection, now: float) -> list[str]:
    """Apply pending migrations, each in its own BEGIN IMMEDIATE transaction.

    The version is read inside each transaction, so two processes migrating at
    once take turns and neither applies a migration twice.
    """
    applied: list[str] = []
    while (name := _when_unlocked(lambda: _transaction(db, _apply_next, now))) is not None:
        applied.append(name)
    return applied


def _apply_next(db: sqlite3.Connection, now: float) -> str | None:
    current = _current_version(db, now)
    migrations.check_not_newer(current, "sqlite")
    todo = migrations.pending("sqlite", current)
    if not todo:
        return None
    for statement in _statements(todo[0].sql):
        try:
            db.execute(statement)
        except sqlite3.OperationalError as exc:
            # Found already in a database that imagegate's idempotent ALTERs upgraded
            # before versioned migrations; any other error stops the migration.
            if todo[0].version > _ADDED_BEFORE_VERSIONS or "duplicate column" not in str(exc):
                raise
    db.execute(
        "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
        (todo[0].version, todo[0].name, now),
    )
    return todo[0].name


def _current_version(db: sqlite3.Connection, now: float) -> int:
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    version = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
    if version is not None:
        return int(version)
    # Made by imagegate before versioned migrations: its schema is version 1.
    if db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'accounts'"
    ).fetchone():
        first = migrations.migrations("sqlite")[0]
        db.execute(
            "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
            (first.version, first.name, now),
        )
        return first.version
    return 0


def _statements(script: str) -> list[str]:
    """Split a script into statements: executescript() would COMMIT our transaction."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer)
            buffer = ""
    if buffer.strip():
        statements.append(buffer)  # a trailing comment, or an error sqlite reports
    return statements


def _account_id(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT id FROM accounts WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise UnknownAccount(f"no account named {name!r}")
    return int(row[0])


def _credit(
    db: sqlite3.Connection, account_id: int | None, micros: int, note: str, now: float
) -> None:
    # The cap keeps the sum an integer: SQLite turns an overflowing sum into a float.
    cur = db.execute(
        "UPDATE accounts SET balance_micros = balance_micros + ? "
        "WHERE id = ? AND balance_micros <= ?",
        (micros, account_id, MAX_BALANCE_MICROS - micros),
    )
    if cur.rowcount != 1:
        raise ValueError(
            f"credit refused: the balance would be over {format_usd(MAX_BALANCE_MICROS)}"
        )
    db.execute(
        "INSERT INTO ledger (account_id, delta_micros, kind, note, created_at) "
        "VALUES (?, ?, 'credit', ?, ?)",
        (account_id, micros, note, now),
    )


# A reservation this transaction resolved: (model, amount held, cost charged).
Resolved = tuple[str, int, int]


def _counted(resolved: list[Resolved | None]) -> int:
    """Count committed resolutions in the money metrics; how many there were."""
    done = [r for r in resolved if r is not None]
    for model, amount, cost in done:
        metrics.resolved(model, amount, cost)
    return len(done)


def _resolve(
    db: sqlite3.Connection,
    reservation_id: str,
    status: str,
    cost: int,
    now: float,
    served: Served | None = None,
) -> Resolved | None:
    """Settle or release a held reservation; a resolved one is left as it is (exactly once)."""
    row = db.execute(
        "SELECT account_id, amount_micros, model FROM reservations "
        "WHERE id = ? AND status = 'held'",
        (reservation_id,),
    ).fetchone()
    if row is None:
        return None
    account_id, amount, model = row
    if not 0 <= cost <= amount:
        raise ValueError(f"cost {cost} outside reservation of {amount}")
    served = served or Served()
    db.execute(
        "UPDATE reservations SET status = ?, cost_micros = ?, resolved_at = ?, provider = ?, "
        "upstream_model = ?, upstream_cost_micros = ? WHERE id = ?",
        (
            status,
            cost,
            now,
            served.provider,
            served.upstream_model,
            served.upstream_cost_micros,
            reservation_id,
        ),
    )
    refund = amount - cost
    if refund:
        db.execute(
            "UPDATE accounts SET balance_micros = balance_micros + ? WHERE id = ?",
            (refund, account_id),
        )
        db.execute(
            "INSERT INTO ledger (account_id, delta_micros, kind, reservation_id, created_at) "
            "VALUES (?, ?, 'refund', ?, ?)",
            (account_id, refund, reservation_id, now),
        )
    return str(model), int(amount), cost


def _finish(
    db: sqlite3.Connection, claim: Claim, response: bytes | None, error: str | None
) -> None:
    db.execute(
        "UPDATE idempotency_keys SET status = 'done', response = ?, error = ? "
        "WHERE account_id = ? AND key = ? AND token = ?",
        (response, error, claim.account_id, claim.key, claim.token),
    )


def _idempotency_record(cur: sqlite3.Cursor) -> IdempotencyRecord | None:
    row = cur.fetchone()
    if row is None:
        return None
    request_hash, status, response, error, locked_until = row
    return IdempotencyRecord(
        bytes(request_hash),
        status,
        None if response is None else bytes(response),
        error,
        locked_until,
    )


def _admin_key(row: Any) -> AdminKeyRecord:
    key_id, name, prefix, key_hash, created, revoked = row
    return AdminKeyRecord(key_id, name, prefix, bytes(key_hash), created, revoked)


def _key_record(row: Any) -> KeyRecord:
    key_id, account_id, account_name, name, prefix, key_hash, models, created, revoked = row[:9]
    return KeyRecord(
        id=key_id,
        account_id=account_id,
        account_name=account_name,
        name=name,
        prefix=prefix,
        key_hash=bytes(key_hash),
        models=None if models is None else tuple(json.loads(models)),
        created_at=created,
        revoked_at=revoked,
        limits=KeyLimits(*row[9:13]),
    )


# Several processes opening a new database at once (workers, replicas, the CLI)
# race to switch it to WAL and to migrate it; SQLite then answers "database is
# locked" at once, without waiting for its busy timeout (it refuses to wait where
# waiting could deadlock). Such a step is simply tried again.
UNLOCK_ATTEMPTS = 50
UNLOCK_PAUSE_S = 0.1


def _when_unlocked(step: Callable[[], T]) -> T:
    for attempt in range(UNLOCK_ATTEMPTS):
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == UNLOCK_ATTEMPTS - 1:
                raise
            time.sleep(UNLOCK_PAUSE_S * (1 + random.random()))
    raise AssertionError("unreachable")
