"""The embedded store: SQLite in WAL mode through aiosqlite, one writer at a time."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from service.errors import InsufficientBalance
from service.money import format_usd
from service.store.base import (
    Account,
    AccountExists,
    Charge,
    KeyRecord,
    UnknownAccount,
    UsageRow,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    -- The CHECK is a backstop: reserve() never lets a balance go below zero.
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

_KEY_COLUMNS = (
    "k.id, k.account_id, a.name, k.name, k.prefix, k.key_hash, k.models, k.created_at, "
    "k.revoked_at"
)


class SqliteStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        # One connection, so transactions of concurrent requests must not interleave.
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path, isolation_level=None)
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA foreign_keys=ON",
            # The CLI may write while the server runs: wait for the lock, don't fail.
            "PRAGMA busy_timeout=5000",
        ):
            await self._db.execute(pragma)
        await self._db.executescript(SCHEMA)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        assert self._db is not None, "store not opened"
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    async def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        async with self._tx() as db, db.execute(sql, args) as cur:
            return await cur.fetchone()

    # Accounts

    async def create_account(self, name: str, credit_micros: int = 0) -> Account:
        now = self._clock()
        async with self._tx() as db:
            async with db.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)) as cur:
                if await cur.fetchone():
                    raise AccountExists(f"account {name!r} already exists")
            cur = await db.execute(
                "INSERT INTO accounts (name, balance_micros, created_at) VALUES (?, 0, ?)",
                (name, now),
            )
            account_id = cur.lastrowid
            assert account_id is not None
            if credit_micros:
                await self._credit(db, account_id, credit_micros, "initial credit", now)
        account = await self.get_account(name)
        assert account is not None
        return account

    async def get_account(self, name: str) -> Account | None:
        row = await self._one(
            "SELECT id, name, balance_micros, created_at FROM accounts WHERE name = ?", (name,)
        )
        return Account(*row) if row else None

    async def add_credit(self, name: str, micros: int, note: str = "") -> Account:
        async with self._tx() as db:
            async with db.execute("SELECT id FROM accounts WHERE name = ?", (name,)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise UnknownAccount(f"no account named {name!r}")
            await self._credit(db, row[0], micros, note, self._clock())
        account = await self.get_account(name)
        assert account is not None
        return account

    async def _credit(
        self, db: aiosqlite.Connection, account_id: int, micros: int, note: str, now: float
    ) -> None:
        await db.execute(
            "UPDATE accounts SET balance_micros = balance_micros + ? WHERE id = ?",
            (micros, account_id),
        )
        await db.execute(
            "INSERT INTO ledger (account_id, delta_micros, kind, note, created_at) "
            "VALUES (?, ?, 'credit', ?, ?)",
            (account_id, micros, note, now),
        )

    # Keys

    async def create_key(
        self, account_name: str, key_hash: bytes, prefix: str, name: str,
        models: tuple[str, ...] | None,
    ) -> KeyRecord:
        key_id = "key_" + secrets.token_hex(8)
        async with self._tx() as db:
            async with db.execute(
                "SELECT id FROM accounts WHERE name = ?", (account_name,)
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                raise UnknownAccount(f"no account named {account_name!r}")
            await db.execute(
                "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, models, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key_id, row[0], name, prefix, key_hash,
                 None if models is None else json.dumps(list(models)), self._clock()),
            )
        record = await self._key_where("k.id = ?", key_id)
        assert record is not None
        return record

    async def find_key(self, key_hash: bytes) -> KeyRecord | None:
        return await self._key_where("k.key_hash = ?", key_hash)

    async def _key_where(self, where: str, arg: object) -> KeyRecord | None:
        row = await self._one(
            f"SELECT {_KEY_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id "
            f"WHERE {where}",
            (arg,),
        )
        return _key_record(row) if row else None

    async def list_keys(self, account_name: str) -> list[KeyRecord]:
        async with self._tx() as db, db.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id "
            "WHERE a.name = ? ORDER BY k.created_at",
            (account_name,),
        ) as cur:
            return [_key_record(row) for row in await cur.fetchall()]

    async def revoke_key(self, key_id: str) -> bool:
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self._clock(), key_id),
            )
            return cur.rowcount == 1

    # Money

    async def reserve(
        self, account_id: int, amount: int, charge: Charge, expires_at: float
    ) -> str:
        reservation_id = "res_" + secrets.token_hex(12)
        now = self._clock()
        async with self._tx() as db:
            # Check and debit in one statement: parallel requests cannot all pass the check.
            cur = await db.execute(
                "UPDATE accounts SET balance_micros = balance_micros - ? "
                "WHERE id = ? AND balance_micros >= ?",
                (amount, account_id, amount),
            )
            if cur.rowcount != 1:
                async with db.execute(
                    "SELECT balance_micros FROM accounts WHERE id = ?", (account_id,)
                ) as bal:
                    row = await bal.fetchone()
                balance = row[0] if row else 0
                raise InsufficientBalance(
                    f"Your balance of {format_usd(balance)} is too low for this request, "
                    f"quoted at {format_usd(amount)}. Add credit to continue."
                )
            await db.execute(
                "INSERT INTO reservations (id, account_id, key_id, request_id, model, n, size, "
                "quality, amount_micros, status, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'held', ?, ?)",
                (reservation_id, account_id, charge.key_id, charge.request_id, charge.model,
                 charge.n, charge.size, charge.quality, amount, now, expires_at),
            )
            await db.execute(
                "INSERT INTO ledger (account_id, delta_micros, kind, reservation_id, created_at) "
                "VALUES (?, ?, 'reserve', ?, ?)",
                (account_id, -amount, reservation_id, now),
            )
        return reservation_id

    async def settle(self, reservation_id: str, cost: int) -> None:
        await self._resolve(reservation_id, "settled", cost)

    async def release(self, reservation_id: str) -> None:
        await self._resolve(reservation_id, "released", 0)

    async def _resolve(self, reservation_id: str, status: str, cost: int) -> None:
        now = self._clock()
        async with self._tx() as db:
            async with db.execute(
                "SELECT account_id, amount_micros FROM reservations "
                "WHERE id = ? AND status = 'held'",
                (reservation_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return  # already resolved (e.g. by expiry): exactly once, so nothing to do
            account_id, amount = row
            if not 0 <= cost <= amount:
                raise ValueError(f"cost {cost} outside reservation of {amount}")
            await db.execute(
                "UPDATE reservations SET status = ?, cost_micros = ?, resolved_at = ? "
                "WHERE id = ?",
                (status, cost, now, reservation_id),
            )
            refund = amount - cost
            if refund:
                await db.execute(
                    "UPDATE accounts SET balance_micros = balance_micros + ? WHERE id = ?",
                    (refund, account_id),
                )
                await db.execute(
                    "INSERT INTO ledger (account_id, delta_micros, kind, reservation_id, "
                    "created_at) VALUES (?, ?, 'refund', ?, ?)",
                    (account_id, refund, reservation_id, now),
                )

    async def release_expired(self, now: float) -> int:
        async with self._tx() as db, db.execute(
            "SELECT id FROM reservations WHERE status = 'held' AND expires_at < ?", (now,)
        ) as cur:
            expired = [row[0] for row in await cur.fetchall()]
        for reservation_id in expired:
            await self.release(reservation_id)
        return len(expired)

    async def ledger_sum(self, account_id: int) -> int:
        row = await self._one(
            "SELECT COALESCE(SUM(delta_micros), 0) FROM ledger WHERE account_id = ?",
            (account_id,),
        )
        return int(row[0])

    async def usage(self, account_name: str, limit: int = 20) -> list[UsageRow]:
        async with self._tx() as db, db.execute(
            "SELECT r.created_at, r.request_id, r.model, r.n, r.size, r.quality, "
            "r.amount_micros, r.cost_micros, r.status FROM reservations r "
            "JOIN accounts a ON a.id = r.account_id WHERE a.name = ? "
            "ORDER BY r.created_at DESC LIMIT ?",
            (account_name, limit),
        ) as cur:
            return [UsageRow(*row) for row in await cur.fetchall()]


def _key_record(row: Any) -> KeyRecord:
    key_id, account_id, account_name, name, prefix, key_hash, models, created, revoked = row
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
    )
