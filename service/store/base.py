"""The store interface the domain core uses; SQLite now, PostgreSQL for many replicas."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    balance_micros: int
    created_at: float


@dataclass(frozen=True)
class KeyLimits:
    """A key's own limits; None: the configured default, 0: no limit."""

    rpm: int | None = None  # requests per minute
    ipm: int | None = None  # images per minute
    concurrency: int | None = None  # requests in flight at once
    max_n: int | None = None  # images per request (the model's own bound still applies)


LIMIT_FIELDS = ("rpm", "ipm", "concurrency", "max_n")


@dataclass(frozen=True)
class KeyRecord:
    id: str
    account_id: int
    account_name: str
    name: str
    prefix: str
    key_hash: bytes
    # None: every model; otherwise the model ids this key may use.
    models: tuple[str, ...] | None
    created_at: float
    revoked_at: float | None
    limits: KeyLimits = KeyLimits()


@dataclass(frozen=True)
class Charge:
    """What a reservation is for; kept with it as the account's usage record."""

    request_id: str
    key_id: str
    model: str
    n: int
    size: str
    quality: str


@dataclass(frozen=True)
class Served:
    """Who made a settled request's images, and what the upstream lists them at (margins).

    Several routes (a split request that failed over in part) are ","-joined in
    call order, provider and upstream model alike.
    """

    provider: str = ""
    upstream_model: str = ""
    upstream_cost_micros: int = 0


@dataclass(frozen=True)
class Instance:
    """A running service process: the owner of the reservations it holds."""

    id: str
    # Machine and pid namespace (Linux boot id + namespace); "" where unknown.
    host: str
    pid: int
    # The process's start time as its host counts it, to tell a reused pid; "" if unknown.
    pid_start: str
    started_at: float
    heartbeat_at: float


@dataclass(frozen=True)
class UsageRow:
    created_at: float
    request_id: str
    model: str
    n: int
    size: str
    quality: str
    quoted_micros: int
    cost_micros: int
    # held (in flight), settled (charged `cost`), released (nothing charged)
    status: str
    # The route(s) that served it and their list cost; empty/0 until settled.
    provider: str = ""
    upstream_model: str = ""
    upstream_cost_micros: int = 0
    # The reservation's id (the usage record's id and paging cursor) and the key used.
    id: str = ""
    key_id: str = ""
    # From reserve to settle or release; None while held.
    latency_ms: int | None = None


@dataclass(frozen=True)
class AccountSummary:
    """An account as the admin API lists it: its balance and what is held now."""

    id: int
    name: str
    balance_micros: int
    held_micros: int
    created_at: float


@dataclass(frozen=True)
class LedgerRow:
    id: int
    created_at: float
    # credit, reserve or refund
    kind: str
    # Signed: a reserve is negative.
    amount_micros: int
    # The account's balance after this entry (the running sum of the ledger).
    balance_micros: int
    # The request of a reserve or refund; "" for a credit.
    request_id: str
    note: str


@dataclass(frozen=True)
class UsageBucketRow:
    """Requests of one day (UTC, "YYYY-MM-DD") x model x key x route, and their spend."""

    day: str
    model: str
    key_id: str
    # The route(s) as the usage row has them; "" for requests not settled.
    provider: str
    upstream_model: str
    requests: int
    # Images of settled requests.
    images: int
    spend_micros: int


@dataclass(frozen=True)
class AccountUsageRow:
    """A usage record with the account it was charged to (the admin API's requests)."""

    account: str
    row: UsageRow


@dataclass(frozen=True)
class AdminKeyRecord:
    id: str
    name: str
    prefix: str
    key_hash: bytes
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class AccountBalance:
    # What can be spent now (held amounts are already taken out of it).
    balance_micros: int
    # Reserved by requests in flight; given back or charged when they end.
    held_micros: int


@dataclass(frozen=True)
class IdempotencyRecord:
    """The stored outcome of an Idempotency-Key, or its claim while the request runs."""

    request_hash: bytes
    # running (claimed by a request in flight) or done
    status: str
    # done: the serialized response, or the domain error (JSON) it ended with.
    response: bytes | None
    error: str | None
    # A running claim past this time was left by a stopped process: it can be taken over.
    locked_until: float


@dataclass(frozen=True)
class Claim:
    """A won Idempotency-Key claim; `token` tells this claim from a later takeover."""

    account_id: int
    key: str
    token: str


class Store(Protocol):
    async def open(self, *, migrate: bool = False) -> list[str]:
        """Connect and check the schema; the names of the migrations applied, if any.

        migrate=True applies pending migrations first (the embedded SQLite store
        always does). SchemaTooNew for a schema newer than this code knows;
        SchemaOutdated for an older one that was not migrated.
        """
        ...

    async def schema_version(self) -> int: ...

    async def close(self) -> None: ...

    async def create_account(self, name: str, credit_micros: int = 0) -> Account: ...

    async def get_account(self, name: str) -> Account | None: ...

    async def add_credit(self, name: str, micros: int, note: str = "") -> Account: ...

    async def create_key(
        self,
        account_name: str,
        key_hash: bytes,
        prefix: str,
        name: str,
        models: tuple[str, ...] | None,
        limits: KeyLimits | None = None,
    ) -> KeyRecord: ...

    async def find_key(self, key_hash: bytes) -> KeyRecord | None: ...

    async def list_keys(self, account_name: str) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str) -> bool: ...

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
        """Hold `amount` atomically; InsufficientBalance if the balance is lower.

        `reservation_id` (new_reservation_id()) lets a caller that stops waiting
        still release what the store commits; `owner` is the holding Instance's id.
        """
        ...

    async def settle(
        self,
        reservation_id: str,
        cost: int,
        served: Served | None = None,
        *,
        done: tuple[Claim, bytes] | None = None,
    ) -> None:
        """Charge `cost` (<= the held amount) and give back the rest; once only.
        `served` records the route(s) and the upstream list cost with the usage row;
        `done` stores the response of an Idempotency-Key claim in the same transaction,
        so a charge is never without its stored response."""
        ...

    async def release(self, reservation_id: str) -> None:
        """Give back everything held; once only."""
        ...

    async def release_expired(self, now: float) -> int: ...

    async def beat(self, instance: Instance) -> None:
        """Record (or re-record) a live instance with its heartbeat_at."""
        ...

    async def instances(self) -> list[Instance]: ...

    async def release_orphans(self, dead: list[str], stale_before: float, keep: str) -> int:
        """Forget the `dead` instances and those whose heartbeat is older than
        `stale_before` (never `keep`), then release every held reservation whose
        owner is no longer recorded. Returns how many were released."""
        ...

    async def retire(self, instance_id: str) -> None:
        """A clean stop: forget the instance (what it still holds becomes an orphan)."""
        ...

    async def ledger_sum(self, account_id: int) -> int: ...

    async def held(self) -> tuple[int, float | None]:
        """Reservations held now, across every process: how many, and the oldest's
        created_at (None when there is none). For the metrics gauges."""
        ...

    async def usage(
        self, account_name: str, limit: int = 20, after: str | None = None
    ) -> list[UsageRow]:
        """The account's usage records, newest first; `after`: only those older than that
        record (a cursor, the id of one of this account's records). UnknownCursor if it is
        not one."""
        ...

    async def balance(self, account_id: int) -> AccountBalance: ...

    # The admin API's reads and changes (service/admin.py).

    async def list_accounts(self) -> list[AccountSummary]:
        """Every account by name, each with what it holds now."""
        ...

    async def ledger(self, account_id: int, limit: int = 100) -> list[LedgerRow]:
        """The account's last `limit` ledger entries, newest first, each with the
        balance after it."""
        ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def all_keys(self) -> list[KeyRecord]:
        """Every account's keys, by account then creation."""
        ...

    async def update_key(
        self,
        key_id: str,
        limits: dict[str, int | None],
        models: tuple[str, ...] | None = None,
        *,
        set_models: bool = False,
    ) -> KeyRecord | None:
        """In one change: some of a key's LIMIT_FIELDS (None: back to the default) and,
        with `set_models`, its model allowlist (None: every model). None if no such key."""
        ...

    async def keys_last_used(self, key_ids: list[str]) -> dict[str, float]:
        """When each key last started a request (keys never used are left out)."""
        ...

    async def usage_by_day(self, account_name: str | None, since: float) -> list[UsageBucketRow]:
        """Requests since `since` of one account (None: all) summed by day x model x
        key x route, oldest day first."""
        ...

    async def recent_usage(
        self, account_name: str | None, limit: int = 20, after: str | None = None
    ) -> list[AccountUsageRow]:
        """As usage(), of one account or (None) of every account, with the account;
        UnknownCursor if `after` is not one of those records."""
        ...

    async def create_admin_key(self, key_hash: bytes, prefix: str, name: str) -> AdminKeyRecord: ...

    async def find_admin_key(self, key_hash: bytes) -> AdminKeyRecord | None: ...

    async def list_admin_keys(self) -> list[AdminKeyRecord]: ...

    async def revoke_admin_key(self, key_id: str) -> bool:
        """Revoke an active admin key; False if there is no such active key."""
        ...

    # Idempotency-Key claims: (account, key) is unique, so one process wins a claim.

    async def claim_idempotency(
        self,
        account_id: int,
        key: str,
        request_hash: bytes,
        locked_until: float,
        token: str,
        owner: str | None = None,
    ) -> IdempotencyRecord | None:
        """Claim the key for this request: None if won (a new row, or a running claim of
        the same request taken over: past its locked_until, or whose owner Instance is no
        longer recorded), else the row as it is."""
        ...

    async def get_idempotency(self, account_id: int, key: str) -> IdempotencyRecord | None: ...

    async def finish_idempotency(
        self, claim: Claim, response: bytes | None, error: str | None
    ) -> None:
        """Store the outcome of a claim that is still this one's."""
        ...

    async def abandon_idempotency(self, claim: Claim) -> None:
        """Delete a claim that is still this one's and running: the next try runs anew."""
        ...

    async def sweep_idempotency(self, created_before: float) -> int:
        """Forget keys created before `created_before`; how many."""
        ...


def check_limit_changes(changes: dict[str, int | None]) -> None:
    """The stores' guard: known limit names, each None or a non-negative int."""
    for name, value in changes.items():
        if name not in LIMIT_FIELDS:
            raise ValueError(f"unknown key limit {name!r}")
        if value is not None and (type(value) is not int or value < 0):
            raise ValueError(f"limit {name} must be a non-negative integer, not {value!r}")


def key_changes(
    limits: dict[str, int | None], models: tuple[str, ...] | None, set_models: bool
) -> dict[str, object]:
    """update_key's column changes, checked: the limits, and the models as stored (JSON,
    NULL for every model) when `set_models`. Column names come from LIMIT_FIELDS only."""
    check_limit_changes(limits)
    changes: dict[str, object] = dict(limits)
    if set_models:
        changes["models"] = None if models is None else json.dumps(list(models))
    return changes


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def new_admin_key_id() -> str:
    return "adm_" + secrets.token_hex(8)


def new_reservation_id() -> str:
    return "res_" + secrets.token_hex(12)


class UnknownCursor(LookupError):
    """A usage cursor that is not one of the account's records."""


class StoreError(RuntimeError):
    """The database cannot be used as it is; the message is one line for the operator."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer imagegate."""


class SchemaOutdated(StoreError):
    """The database needs `imagegate migrate` before this imagegate can use it."""


class DatabaseUnavailable(StoreError):
    """No driver for the URL, or the server cannot be reached."""


class UnknownAccount(LookupError):
    """An admin command named an account that does not exist."""


class AccountExists(ValueError):
    """`accounts create` for a name that is taken."""
