"""The store for many replicas: PostgreSQL through an asyncpg pool, one statement per change.

Every balance change is one statement (data-modifying CTEs), so it commits or
not as a whole with its ledger row, and holds a row lock for one round trip.
Under READ COMMITTED a conditional UPDATE that waited for another replica's
lock re-reads the row before checking its WHERE: `balance_micros >= amount`
and `status = 'held'` are decided on the committed value, so no interleaving
of replicas overspends, and a reservation is resolved by exactly one of them.
Lock order is always reservation row, then account row, so settles, releases
and reserves cannot deadlock one another.

asyncpg is imported here only: SQLite users never need it (the `postgres` extra).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from service import metrics
from service.errors import InsufficientBalance
from service.money import MAX_BALANCE_MICROS, check_credit, format_usd
from service.store import migrations
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
    DatabaseUnavailable,
    IdempotencyRecord,
    Instance,
    KeyLimits,
    KeyRecord,
    LedgerRow,
    Served,
    StoreError,
    UnknownAccount,
    UnknownCursor,
    UsageBucketRow,
    UsageRow,
    key_changes,
    new_admin_key_id,
    new_key_id,
    new_reservation_id,
)

try:
    import asyncpg
except ImportError as exc:
    raise DatabaseUnavailable(
        "a postgresql:// database needs asyncpg: pip install 'imagegate[postgres]'"
    ) from exc

# Both replicas of a rolling start may run `imagegate migrate`: one waits for the other.
# The lock is per schema (search_path), so separate schemas of one database never wait.
_MIGRATE_LOCK_CLASS = 0x1A6E  # an arbitrary constant naming imagegate's lock space

_KEY_SELECT = (
    "SELECT k.id, k.account_id, a.name, k.name, k.prefix, k.key_hash, k.models, k.created_at, "
    "k.revoked_at, k.rpm, k.ipm, k.concurrency, k.max_n "
    "FROM api_keys k JOIN accounts a ON a.id = k.account_id "
)
_USAGE_COLUMNS = (
    "SELECT r.created_at, r.request_id, r.model, r.n, r.size, r.quality, "
    "r.amount_micros, r.cost_micros, r.status, r.provider, r.upstream_model, "
    "r.upstream_cost_micros, r.id, r.key_id, "
    "ROUND((r.resolved_at - r.created_at) * 1000)::bigint"
)
_USAGE_SELECT = _USAGE_COLUMNS + " FROM reservations r "
_ADMIN_KEY_SELECT = "SELECT id, name, prefix, key_hash, created_at, revoked_at FROM admin_keys "
_IDEMPOTENCY_SELECT = (
    "SELECT request_hash, status, response, error, locked_until FROM idempotency_keys "
    "WHERE account_id = $1 AND key = $2"
)
# The claim: a new row, or a takeover of a running claim of the same request whose
# lock has passed or whose owner Instance is gone. The row lock ON CONFLICT takes
# makes one of several replicas the winner; the others see the winner's row.
_CLAIM = """
INSERT INTO idempotency_keys (account_id, key, request_hash, status, token, owner,
                              created_at, locked_until)
VALUES ($1, $2, $3, 'running', $4, $5, $6, $7)
ON CONFLICT (account_id, key) DO UPDATE
SET token = excluded.token, owner = excluded.owner, locked_until = excluded.locked_until
WHERE idempotency_keys.status = 'running'
  AND idempotency_keys.request_hash = excluded.request_hash
  AND (idempotency_keys.locked_until < $6
       OR (idempotency_keys.owner IS NOT NULL AND NOT EXISTS
           (SELECT 1 FROM instances i WHERE i.id = idempotency_keys.owner)))
RETURNING token
"""
_FINISH = (
    "UPDATE idempotency_keys SET status = 'done', response = $4, error = $5 "
    "WHERE account_id = $1 AND key = $2 AND token = $3"
)

# Debit only if the balance covers it; the reservation and its ledger row come
# from the debit's RETURNING, so without a debit nothing else is written.
_RESERVE = """
WITH debit AS (
    UPDATE accounts SET balance_micros = balance_micros - $2
    WHERE id = $1 AND balance_micros >= $2
    RETURNING id
), held AS (
    INSERT INTO reservations (id, account_id, key_id, request_id, model, n, size, quality,
                              amount_micros, status, created_at, expires_at, owner)
    SELECT $3, id, $4, $5, $6, $7, $8, $9, $2, 'held', $10, $11, $12 FROM debit
    RETURNING id, account_id
)
INSERT INTO ledger (account_id, delta_micros, kind, reservation_id, created_at)
SELECT account_id, -$2, 'reserve', id, $10 FROM held
RETURNING id
"""

# Only a held reservation changes; whichever replica's UPDATE commits first wins
# and the other finds status <> 'held' and changes nothing. The CTEs run to
# completion whatever the final SELECT reads; it counts what was resolved.
_RESOLVE = """
WITH resolved AS (
    UPDATE reservations SET status = $2, cost_micros = $3, resolved_at = $4,
                            provider = $5, upstream_model = $6, upstream_cost_micros = $7
    WHERE id = $1 AND status = 'held' AND $3 BETWEEN 0 AND amount_micros
    RETURNING account_id, amount_micros - $3 AS refund, amount_micros, model
), refunded AS (
    UPDATE accounts SET balance_micros = balance_micros + resolved.refund
    FROM resolved WHERE accounts.id = resolved.account_id AND resolved.refund > 0
), entry AS (
    INSERT INTO ledger (account_id, delta_micros, kind, reservation_id, created_at)
    SELECT account_id, refund, 'refund', $1, $4 FROM resolved WHERE refund > 0
)
SELECT model, amount_micros FROM resolved
"""


# A reservation a statement resolved: (model, amount held, cost charged).
Resolved = tuple[str, int, int]


def _counted(resolved: list[Resolved | None]) -> int:
    """Count committed resolutions in the money metrics; how many there were."""
    done = [r for r in resolved if r is not None]
    for model, amount, cost in done:
        metrics.resolved(model, amount, cost)
    return len(done)


class PostgresStore:
    def __init__(
        self, url: str, *, pool_size: int = 10, clock: Callable[[], float] = time.time
    ) -> None:
        self._url = url
        self._pool_size = pool_size
        self._clock = clock
        self._pool: Any = None

    @property
    def _db(self) -> Any:
        assert self._pool is not None, "store not opened"
        return self._pool

    async def open(self, *, migrate: bool = False) -> list[str]:
        try:
            pool = await asyncpg.create_pool(
                self._url, min_size=1, max_size=self._pool_size, command_timeout=60
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DatabaseUnavailable(
                f"cannot connect to PostgreSQL at {_where(self._url)}: {exc}"
            ) from None
        try:
            applied = await _migrate(pool, self._clock()) if migrate else []
            async with pool.acquire() as conn:
                migrations.check_current(await _version(conn), "postgres")
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, asyncpg.PostgresError):  # e.g. no right to create tables
                raise StoreError(f"PostgreSQL at {_where(self._url)}: {exc}") from None
            raise
        self._pool = pool
        return applied

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def schema_version(self) -> int:
        async with self._db.acquire() as conn:
            return await _version(conn)

    # Accounts

    async def create_account(self, name: str, credit_micros: int = 0) -> Account:
        check_credit(credit_micros)
        row = await self._db.fetchrow(
            """
            WITH created AS (
                INSERT INTO accounts (name, balance_micros, created_at) VALUES ($1, $2, $3)
                ON CONFLICT (name) DO NOTHING
                RETURNING id, name, balance_micros, created_at
            ), credited AS (
                INSERT INTO ledger (account_id, delta_micros, kind, note, created_at)
                SELECT id, $2, 'credit', 'initial credit', $3 FROM created WHERE $2 <> 0
            )
            SELECT * FROM created
            """,
            name,
            credit_micros,
            self._clock(),
        )
        if row is None:
            raise AccountExists(f"account {name!r} already exists")
        return _account(row)

    async def get_account(self, name: str) -> Account | None:
        row = await self._db.fetchrow(
            "SELECT id, name, balance_micros, created_at FROM accounts WHERE name = $1", name
        )
        return None if row is None else _account(row)

    async def add_credit(self, name: str, micros: int, note: str = "") -> Account:
        check_credit(micros)
        # The same cap as SQLite's, where an overflowing sum would become a float.
        row = await self._db.fetchrow(
            """
            WITH credited AS (
                UPDATE accounts SET balance_micros = balance_micros + $2
                WHERE name = $1 AND balance_micros <= $5::bigint - $2
                RETURNING id, name, balance_micros, created_at
            ), entry AS (
                INSERT INTO ledger (account_id, delta_micros, kind, note, created_at)
                SELECT id, $2, 'credit', $3, $4 FROM credited
            )
            SELECT * FROM credited
            """,
            name,
            micros,
            note,
            self._clock(),
            MAX_BALANCE_MICROS,
        )
        if row is None:
            if await self.get_account(name) is None:
                raise UnknownAccount(f"no account named {name!r}")
            raise ValueError(
                f"credit refused: the balance would be over {format_usd(MAX_BALANCE_MICROS)}"
            )
        return _account(row)

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
        inserted = await self._db.fetchval(
            "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, models, created_at, "
            "rpm, ipm, concurrency, max_n) "
            "SELECT $1, id, $3, $4, $5, $6, $7, $8, $9, $10, $11 FROM accounts WHERE name = $2 "
            "RETURNING id",
            key_id,
            account_name,
            name,
            prefix,
            key_hash,
            None if models is None else json.dumps(list(models)),
            self._clock(),
            *(getattr(limits, f) for f in LIMIT_FIELDS),
        )
        if inserted is None:
            raise UnknownAccount(f"no account named {account_name!r}")
        (record,) = await self._keys("WHERE k.id = $1", key_id)
        return record

    async def find_key(self, key_hash: bytes) -> KeyRecord | None:
        records = await self._keys("WHERE k.key_hash = $1", key_hash)
        return records[0] if records else None

    async def list_keys(self, account_name: str) -> list[KeyRecord]:
        return await self._keys("WHERE a.name = $1 ORDER BY k.created_at, k.id", account_name)

    async def _keys(self, where: str, *args: Any) -> list[KeyRecord]:
        return [_key_record(row) for row in await self._db.fetch(_KEY_SELECT + where, *args)]

    async def revoke_key(self, key_id: str) -> bool:
        revoked = await self._db.fetchval(
            "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL RETURNING id",
            key_id,
            self._clock(),
        )
        return revoked is not None

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
        entry = await self._db.fetchval(
            _RESERVE,
            account_id,
            amount,
            reservation_id,
            charge.key_id,
            charge.request_id,
            charge.model,
            charge.n,
            charge.size,
            charge.quality,
            self._clock(),
            expires_at,
            owner,
        )
        if entry is None:
            balance = await self._db.fetchval(
                "SELECT balance_micros FROM accounts WHERE id = $1", account_id
            )
            raise InsufficientBalance(
                f"Your balance of {format_usd(balance or 0)} is too low for this "
                f"request, quoted at {format_usd(amount)}. Add credit to continue."
            )
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
        if done is None:
            _counted([await self._resolve(reservation_id, "settled", cost, self._clock(), served)])
            return
        # The charge and the stored response commit together.
        claim, response = done
        async with self._db.acquire() as conn, conn.transaction():
            resolved = await self._resolve(
                reservation_id, "settled", cost, self._clock(), served, conn
            )
            await conn.execute(_FINISH, claim.account_id, claim.key, claim.token, response, None)
        _counted([resolved])  # once committed

    async def release(self, reservation_id: str) -> None:
        _counted([await self._resolve(reservation_id, "released", 0, self._clock())])

    async def _resolve(
        self,
        reservation_id: str,
        status: str,
        cost: int,
        now: float,
        served: Served | None = None,
        conn: Any = None,
    ) -> Resolved | None:
        """What this call resolved (model, amount held, cost); None if it was resolved
        already. Counted in the money metrics by the caller, once committed."""
        served = served or Served()
        db = self._db if conn is None else conn
        row = await db.fetchrow(
            _RESOLVE,
            reservation_id,
            status,
            cost,
            now,
            served.provider,
            served.upstream_model,
            served.upstream_cost_micros,
        )
        if row is not None:
            return str(row["model"]), int(row["amount_micros"]), cost
        amount = await db.fetchval(
            "SELECT amount_micros FROM reservations WHERE id = $1 AND status = 'held'",
            reservation_id,
        )
        if amount is not None:  # still held: the cost was out of range
            raise ValueError(f"cost {cost} outside reservation of {amount}")
        return None

    async def release_expired(self, now: float) -> int:
        # One reservation per statement: each is resolved exactly once even when
        # every replica sweeps at the same moment, and no sweep locks many rows.
        due = await self._db.fetch(
            "SELECT id FROM reservations WHERE status = 'held' AND expires_at < $1 ORDER BY id",
            now,
        )
        return await self._release_each([row["id"] for row in due], now)

    async def _release_each(self, reservation_ids: list[str], now: float) -> int:
        return _counted(
            [
                await self._resolve(reservation_id, "released", 0, now)
                for reservation_id in reservation_ids
            ]
        )

    # Instances

    async def beat(self, instance: Instance) -> None:
        await self._db.execute(
            "INSERT INTO instances (id, host, pid, pid_start, started_at, heartbeat_at) "
            "VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            instance.id,
            instance.host,
            instance.pid,
            instance.pid_start,
            instance.started_at,
            instance.heartbeat_at,
        )

    async def instances(self) -> list[Instance]:
        rows = await self._db.fetch(
            "SELECT id, host, pid, pid_start, started_at, heartbeat_at FROM instances"
        )
        return [Instance(*row) for row in rows]

    async def release_orphans(self, dead: list[str], stale_before: float, keep: str) -> int:
        # Each replica may run this at once: forgetting an instance twice is harmless,
        # and each orphan is resolved by one statement guarded by status = 'held'.
        await self._db.execute(
            "DELETE FROM instances WHERE (id = ANY($1::text[]) OR heartbeat_at < $2) AND id <> $3",
            [i for i in dead if i != keep],
            stale_before,
            keep,
        )
        orphans = await self._db.fetch(
            "SELECT id FROM reservations WHERE status = 'held' AND owner IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = reservations.owner) "
            "ORDER BY id"
        )
        return await self._release_each([row["id"] for row in orphans], self._clock())

    async def retire(self, instance_id: str) -> None:
        await self._db.execute("DELETE FROM instances WHERE id = $1", instance_id)

    async def ledger_sum(self, account_id: int) -> int:
        # SUM(bigint) is numeric in PostgreSQL: back to bigint, never a float or Decimal.
        total = await self._db.fetchval(
            "SELECT COALESCE(SUM(delta_micros), 0)::bigint FROM ledger WHERE account_id = $1",
            account_id,
        )
        return int(total)

    async def held(self) -> tuple[int, float | None]:
        row = await self._db.fetchrow(
            "SELECT count(*) AS n, min(created_at) AS oldest FROM reservations "
            "WHERE status = 'held'"
        )
        return int(row["n"]), row["oldest"]

    async def usage(
        self, account_name: str, limit: int = 20, after: str | None = None
    ) -> list[UsageRow]:
        where = "WHERE r.account_id = (SELECT id FROM accounts WHERE name = $1)"
        args: list[Any] = [account_name]
        if after is not None:
            cursor = await self._db.fetchrow(
                "SELECT r.created_at, r.seq FROM reservations r JOIN accounts a "
                "ON a.id = r.account_id WHERE a.name = $1 AND r.id = $2",
                account_name,
                after,
            )
            if cursor is None:
                raise UnknownCursor(f"no usage record {after!r} in account {account_name!r}")
            where += " AND (r.created_at, r.seq) < ($2, $3)"
            args += [cursor["created_at"], cursor["seq"]]
        rows = await self._db.fetch(
            f"{_USAGE_SELECT}{where} ORDER BY r.created_at DESC, r.seq DESC LIMIT ${len(args) + 1}",
            *args,
            limit,
        )
        return [_usage_row(row) for row in rows]

    async def balance(self, account_id: int) -> AccountBalance:
        row = await self._db.fetchrow(
            "SELECT a.balance_micros, (SELECT COALESCE(SUM(amount_micros), 0)::bigint "
            "FROM reservations WHERE account_id = a.id AND status = 'held') AS held "
            "FROM accounts a WHERE a.id = $1",
            account_id,
        )
        if row is None:
            raise UnknownAccount(f"no account with id {account_id}")
        return AccountBalance(int(row["balance_micros"]), int(row["held"]))

    # The admin API

    async def list_accounts(self) -> list[AccountSummary]:
        rows = await self._db.fetch(
            "SELECT a.id, a.name, a.balance_micros, (SELECT COALESCE(SUM(amount_micros), 0) "
            "FROM reservations WHERE account_id = a.id AND status = 'held')::bigint, "
            "a.created_at FROM accounts a ORDER BY a.name"
        )
        return [AccountSummary(int(r[0]), r[1], int(r[2]), int(r[3]), float(r[4])) for r in rows]

    async def ledger(self, account_id: int, limit: int = 100) -> list[LedgerRow]:
        # The running balance over the whole ledger, then the newest `limit` of it.
        rows = await self._db.fetch(
            "SELECT * FROM (SELECT l.id, l.created_at, l.kind, l.delta_micros, "
            "(SUM(l.delta_micros) OVER (ORDER BY l.id))::bigint, COALESCE(r.request_id, ''), "
            "l.note FROM ledger l LEFT JOIN reservations r ON r.id = l.reservation_id "
            "WHERE l.account_id = $1) AS entries ORDER BY 1 DESC LIMIT $2",
            account_id,
            limit,
        )
        return [
            LedgerRow(int(r[0]), float(r[1]), r[2], int(r[3]), int(r[4]), r[5], r[6]) for r in rows
        ]

    async def get_key(self, key_id: str) -> KeyRecord | None:
        records = await self._keys("WHERE k.id = $1", key_id)
        return records[0] if records else None

    async def all_keys(self) -> list[KeyRecord]:
        return await self._keys("ORDER BY a.name, k.created_at, k.id")

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
            # One statement: the models and limits change together or not at all.
            assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, 2))
            await self._db.execute(
                f"UPDATE api_keys SET {assignments} WHERE id = $1", key_id, *changes.values()
            )
        return await self.get_key(key_id)

    async def keys_last_used(self, key_ids: list[str]) -> dict[str, float]:
        if not key_ids:
            return {}
        rows = await self._db.fetch(
            "SELECT key_id, MAX(created_at) FROM reservations WHERE key_id = ANY($1::text[]) "
            "GROUP BY key_id",
            key_ids,
        )
        return {r[0]: float(r[1]) for r in rows}

    async def usage_by_day(self, account_name: str | None, since: float) -> list[UsageBucketRow]:
        where = "WHERE r.created_at >= $1"
        args: list[Any] = [since]
        if account_name is not None:
            where += " AND r.account_id = (SELECT id FROM accounts WHERE name = $2)"
            args.append(account_name)
        rows = await self._db.fetch(
            "SELECT to_char(to_timestamp(r.created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, "
            "r.model, r.key_id, r.provider, r.upstream_model, COUNT(*), "
            "SUM(CASE WHEN r.status = 'settled' THEN r.n ELSE 0 END), SUM(r.cost_micros) "
            f"FROM reservations r {where} "
            "GROUP BY day, r.model, r.key_id, r.provider, r.upstream_model "
            "ORDER BY day, r.model, r.key_id, r.provider, r.upstream_model",
            *args,
        )
        return [
            UsageBucketRow(r[0], r[1], r[2], r[3], r[4], int(r[5]), int(r[6]), int(r[7]))
            for r in rows
        ]

    async def recent_usage(
        self, account_name: str | None, limit: int = 20, after: str | None = None
    ) -> list[AccountUsageRow]:
        conditions: list[str] = []
        args: list[Any] = []
        if account_name is not None:
            args.append(account_name)
            conditions.append(f"a.name = ${len(args)}")
        if after is not None:
            cursor = await self._db.fetchrow(
                "SELECT r.created_at, r.seq FROM reservations r JOIN accounts a "
                "ON a.id = r.account_id WHERE r.id = $1 AND ($2::text IS NULL OR a.name = $2)",
                after,
                account_name,
            )
            if cursor is None:
                raise UnknownCursor(f"no usage record {after!r}")
            args += [cursor["created_at"], cursor["seq"]]
            conditions.append(f"(r.created_at, r.seq) < (${len(args) - 1}, ${len(args)})")
        where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
        rows = await self._db.fetch(
            f"{_USAGE_COLUMNS}, a.name FROM reservations r "
            f"JOIN accounts a ON a.id = r.account_id {where} "
            f"ORDER BY r.created_at DESC, r.seq DESC LIMIT ${len(args) + 1}",
            *args,
            limit,
        )
        return [AccountUsageRow(row[-1], _usage_row(list(row)[:-1])) for row in rows]

    async def create_admin_key(self, key_hash: bytes, prefix: str, name: str) -> AdminKeyRecord:
        record = AdminKeyRecord(new_admin_key_id(), name, prefix, key_hash, self._clock(), None)
        await self._db.execute(
            "INSERT INTO admin_keys (id, name, prefix, key_hash, created_at) "
            "VALUES ($1, $2, $3, $4, $5)",
            record.id,
            name,
            prefix,
            key_hash,
            record.created_at,
        )
        return record

    async def find_admin_key(self, key_hash: bytes) -> AdminKeyRecord | None:
        row = await self._db.fetchrow(_ADMIN_KEY_SELECT + "WHERE key_hash = $1", key_hash)
        return None if row is None else _admin_key(row)

    async def list_admin_keys(self) -> list[AdminKeyRecord]:
        rows = await self._db.fetch(_ADMIN_KEY_SELECT + "ORDER BY created_at, id")
        return [_admin_key(row) for row in rows]

    async def revoke_admin_key(self, key_id: str) -> bool:
        revoked = await self._db.fetchval(
            "UPDATE admin_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL "
            "RETURNING id",
            key_id,
            self._clock(),
        )
        return revoked is not None

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
        won = await self._db.fetchval(
            _CLAIM, account_id, key, request_hash, token, owner, self._clock(), locked_until
        )
        if won is not None:
            return None
        found = await self.get_idempotency(account_id, key)
        if found is None:
            # The winner abandoned it between the two statements: try again.
            return await self.claim_idempotency(
                account_id, key, request_hash, locked_until, token, owner
            )
        return found

    async def get_idempotency(self, account_id: int, key: str) -> IdempotencyRecord | None:
        row = await self._db.fetchrow(_IDEMPOTENCY_SELECT, account_id, key)
        if row is None:
            return None
        response = row["response"]
        return IdempotencyRecord(
            bytes(row["request_hash"]),
            row["status"],
            None if response is None else bytes(response),
            row["error"],
            float(row["locked_until"]),
        )

    async def finish_idempotency(
        self, claim: Claim, response: bytes | None, error: str | None
    ) -> None:
        await self._db.execute(_FINISH, claim.account_id, claim.key, claim.token, response, error)

    async def abandon_idempotency(self, claim: Claim) -> None:
        await self._db.execute(
            "DELETE FROM idempotency_keys WHERE account_id = $1 AND key = $2 AND token = $3 "
            "AND status = 'running'",
            claim.account_id,
            claim.key,
            claim.token,
        )

    async def sweep_idempotency(self, created_before: float) -> int:
        deleted = await self._db.fetch(
            "DELETE FROM idempotency_keys WHERE created_at < $1 RETURNING 1", created_before
        )
        return len(deleted)


async def _migrate(pool: Any, now: float) -> list[str]:
    """Apply pending migrations, each in a transaction under a per-schema advisory lock."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        while True:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))",
                    _MIGRATE_LOCK_CLASS,
                )
                # Created under the lock: a concurrent CREATE IF NOT EXISTS can still collide.
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                    "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
                )
                current = await _version(conn)
                migrations.check_not_newer(current, "postgres")
                todo = migrations.pending("postgres", current)
                if not todo:
                    return applied
                try:
                    await conn.execute(todo[0].sql)
                except asyncpg.PostgresError as exc:  # e.g. no CREATE right on the schema
                    raise StoreError(f"migration {todo[0].name} failed: {exc}") from None
                await conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)",
                    todo[0].version,
                    todo[0].name,
                    now,
                )
            applied.append(todo[0].name)


async def _version(conn: Any) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))


def _where(url: str) -> str:
    """host:port/database for messages: never the password a URL may carry."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname or 'localhost'}{port}{parts.path or ''}"


def _account(row: Any) -> Account:
    return Account(
        id=int(row["id"]),
        name=row["name"],
        balance_micros=int(row["balance_micros"]),
        created_at=float(row["created_at"]),
    )


def _usage_row(row: Any) -> UsageRow:
    # ROUND(...)::bigint comes back as int already; only NULL needs care.
    values = list(row)
    values[-1] = None if values[-1] is None else int(values[-1])
    return UsageRow(*values)


def _admin_key(row: Any) -> AdminKeyRecord:
    key_id, name, prefix, key_hash, created, revoked = row
    return AdminKeyRecord(key_id, name, prefix, bytes(key_hash), created, revoked)


def _key_record(row: Any) -> KeyRecord:
    key_id, account_id, account_name, name, prefix, key_hash, models, created, revoked = row[:9]
    return KeyRecord(
        id=key_id,
        account_id=int(account_id),
        account_name=account_name,
        name=name,
        prefix=prefix,
        key_hash=bytes(key_hash),
        models=None if models is None else tuple(json.loads(models)),
        created_at=created,
        revoked_at=revoked,
        limits=KeyLimits(*row[9:13]),
    )
