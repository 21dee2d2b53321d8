"""The operator's operations: accounts, credit, keys, usage, the models' routes. No grpc here.

One code path for each: the AdminService (service/admin_servicer.py), an account
key's calls on its own keys and usage (ImageService), and the CLI's admin commands
(service/cli.py) all call these.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from service import keys, observe
from service.catalog import Catalog, ModelSpec, TokenPrices
from service.core import Caller, page_size
from service.errors import (
    AccountNotFound,
    AccountTaken,
    AdminRequired,
    InvalidApiKey,
    InvalidParameter,
    KeyNotFound,
    ModelNotAllowed,
)
from service.money import credit_micros
from service.providers.dispatch import RouteHealth
from service.providers.registry import ProviderStatus
from service.store.base import (
    LIMIT_FIELDS,
    AccountExists,
    AccountSummary,
    AccountUsageRow,
    AdminKeyRecord,
    KeyLimits,
    KeyRecord,
    LedgerRow,
    Store,
    UnknownAccount,
    UnknownCursor,
    UsageBucketRow,
)

ADMIN_PREFIX = "sk-admin-"
# As API keys: 32 random bytes, URL-safe base64 without padding (43 characters).
_ADMIN_KEY_RE = re.compile(r"sk-admin-[A-Za-z0-9_-]{43}")
INVALID_ADMIN = "Incorrect admin key provided. Create one with `imagegate admin-keys create`."
ADMIN_ONLY = "This endpoint needs an admin key (sk-admin-...); an account's API key cannot use it."
# Account names end up in URL paths (/admin/v1/accounts/{account}): one segment.
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_KEY_NAME = 64
LEDGER_ENTRIES = 100
DEFAULT_DAYS = 30
MAX_DAYS = 366
DAY_S = 86400
# In an UpdateKey's limits: back to the configured default.
DEFAULT_LIMIT = -1


def new_admin_key() -> str:
    return ADMIN_PREFIX + secrets.token_urlsafe(32)


def route_text(provider: str, upstream_model: str) -> str:
    """provider/upstream_model, ","-joined when several routes served one request."""
    if not provider:
        return ""
    routes = zip(provider.split(","), upstream_model.split(","), strict=False)
    return ",".join(f"{p}/{m}" for p, m in routes)


@dataclass(frozen=True)
class KeyView:
    record: KeyRecord
    # When it last started a request; None: never.
    last_used: float | None


@dataclass(frozen=True)
class AccountDetail:
    account: AccountSummary
    # Newest first.
    ledger: list[LedgerRow]


@dataclass(frozen=True)
class RouteInfo:
    provider: str
    kind: str
    upstream_model: str
    live: bool
    # Why not live; "" when it is.
    missing: str
    # closed, open or half_open: this process's breaker ("closed" if never called).
    breaker: str


@dataclass(frozen=True)
class ModelInfo:
    id: str
    family: str
    # (size, quality, micro-USD per image), sorted.
    prices: list[tuple[str, str, int]]
    token_prices: TokenPrices | None
    routes: list[RouteInfo]

    @property
    def served(self) -> bool:
        return any(r.live for r in self.routes)


def model_infos(
    catalog: Catalog, status: Mapping[str, ProviderStatus], health: Iterable[RouteHealth]
) -> list[ModelInfo]:
    """Every catalog model (served or not), its prices, and each route's state."""
    breakers = {(h.provider, h.upstream_model): h.state for h in health}
    return [_model_info(catalog, catalog.models[i], status, breakers) for i in catalog.ids()]


def _model_info(
    catalog: Catalog,
    spec: ModelSpec,
    status: Mapping[str, ProviderStatus],
    breakers: Mapping[tuple[str, str], str],
) -> ModelInfo:
    routes = []
    for r in spec.routes:
        provider = status.get(r.provider)
        settings = catalog.providers.get(r.provider)
        routes.append(
            RouteInfo(
                provider=r.provider,
                kind=settings.kind if settings else (provider.kind if provider else ""),
                upstream_model=r.upstream_model,
                live=provider is not None and provider.live,
                missing="not declared" if provider is None else provider.missing,
                breaker=breakers.get((r.provider, r.upstream_model), "closed"),
            )
        )
    prices = [(size, quality, p) for (size, quality), p in sorted(spec.prices.items())]
    return ModelInfo(spec.id, spec.family, prices, spec.token_prices, routes)


class Admin:
    """The operations over one store; `catalog`, `status` and `health` are the running
    service's (the CLI, which runs none, passes what it loads itself)."""

    def __init__(
        self,
        store: Store,
        *,
        catalog: Catalog | None = None,
        status: Mapping[str, ProviderStatus] | None = None,
        health: Callable[[], Sequence[RouteHealth]] = list,
        clock: Callable[[], float] = time.time,
        key_changed: Callable[[str], None] = lambda key_id: None,
    ) -> None:
        self._store = store
        # Told the id of a key revoked or changed here (the service's key cache).
        self._key_changed = key_changed
        self._catalog = catalog
        self._status = status or {}
        self._health = health
        self._clock = clock

    # Credentials

    async def authenticate(self, authorization: str | None) -> AdminKeyRecord:
        """The admin key in `Authorization: Bearer sk-admin-...`; InvalidApiKey for none,
        an unknown or a revoked one, AdminRequired for an account's valid API key."""
        token = keys.bearer_token(authorization)
        if _ADMIN_KEY_RE.fullmatch(token):
            digest = keys.hash_key(token)
            record = await self._store.find_admin_key(digest)
            # Found by hash; the constant-time compare keeps the last check free of
            # timing differences whatever the index did.
            if (
                record is None
                or not hmac.compare_digest(record.key_hash, digest)
                or record.revoked_at is not None
            ):
                raise InvalidApiKey(INVALID_ADMIN)
            # The access log line names the admin key (never the key) for an audit trail.
            observe.current().key_id = record.id
            return record
        # 403 only for a key that is one: anything else is a 401 as on ImageService.
        key = keys.key_from_authorization(authorization)
        digest = keys.hash_key(key)
        account_key = await self._store.find_key(digest)
        if (
            account_key is not None
            and hmac.compare_digest(account_key.key_hash, digest)
            and account_key.revoked_at is None
        ):
            raise AdminRequired(ADMIN_ONLY)
        raise InvalidApiKey(keys.INVALID)

    async def create_admin_key(self, name: str) -> tuple[str, AdminKeyRecord]:
        """A new admin key (shown once) and its record; only its hash is kept."""
        key = new_admin_key()
        record = await self._store.create_admin_key(
            keys.hash_key(key), keys.display_prefix(key, len(ADMIN_PREFIX) + 4), name
        )
        return key, record

    async def list_admin_keys(self) -> list[AdminKeyRecord]:
        return await self._store.list_admin_keys()

    async def revoke_admin_key(self, key_id: str) -> None:
        if not await self._store.revoke_admin_key(key_id):
            raise KeyNotFound(f"No active admin key with id {key_id!r}.")

    # Accounts

    async def create_account(self, name: str, credit_usd: str | None = None) -> AccountSummary:
        """A new account; `credit_usd` its first credit (None: none, "0" allowed)."""
        if not _ACCOUNT_NAME.fullmatch(name):
            raise InvalidParameter(
                f"Invalid account name {name[:70]!r}: use 1-64 letters, digits, '.', '_' or "
                "'-', starting with a letter or digit.",
                param="name",
                missing=not name,
            )
        micros = 0 if credit_usd is None else _usd(credit_usd, "credit_usd", allow_zero=True)
        try:
            await self._store.create_account(name, micros)
        except AccountExists:
            raise AccountTaken(f"An account named {name!r} already exists.") from None
        return await self._summary(name)

    async def list_accounts(self) -> list[AccountSummary]:
        return await self._store.list_accounts()

    async def show_account(self, name: str) -> AccountDetail:
        summary = await self._summary(name)
        return AccountDetail(summary, await self._store.ledger(summary.id, LEDGER_ENTRIES))

    async def credit(self, name: str, amount_usd: str, note: str = "") -> AccountSummary:
        micros = _usd(amount_usd, "amount_usd")
        try:
            await self._store.add_credit(name, micros, note or "credit")
        except UnknownAccount:
            raise _no_account(name) from None
        except ValueError as exc:  # over the balance cap
            raise InvalidParameter(f"{exc}.", param="amount_usd") from None
        return await self._summary(name)

    async def ledger_sum(self, account_id: int) -> int:
        return await self._store.ledger_sum(account_id)

    async def _summary(self, name: str) -> AccountSummary:
        account = await self._store.get_account(name)
        if account is None:
            raise _no_account(name)
        balance = await self._store.balance(account.id)
        return AccountSummary(
            account.id,
            account.name,
            balance.balance_micros,
            balance.held_micros,
            account.created_at,
        )

    # Keys

    async def create_key(
        self,
        account: str,
        name: str = "",
        models: Sequence[str] | None = None,
        limits: KeyLimits | None = None,
    ) -> tuple[str, KeyView]:
        """A new API key (shown once) for `account`; models None or empty: every model."""
        _check_key_name(name)
        allowed = _models(models)
        limits = limits or KeyLimits()
        _check_limits({f: getattr(limits, f) for f in LIMIT_FIELDS}, allow_default=False)
        key = keys.new_key()
        try:
            record = await self._store.create_key(
                account, keys.hash_key(key), keys.display_prefix(key), name, allowed, limits
            )
        except UnknownAccount:
            raise _no_account(account) from None
        return key, KeyView(record, None)

    async def list_keys(self, account: str | None = None) -> list[KeyView]:
        """An account's keys (or every account's), revoked ones too."""
        if account:
            if await self._store.get_account(account) is None:
                raise _no_account(account)
            records = await self._store.list_keys(account)
        else:
            records = await self._store.all_keys()
        return await self._views(records)

    async def get_key(self, key_id: str) -> KeyView:
        record = await self._store.get_key(key_id)
        if record is None:
            raise _no_key(key_id)
        return (await self._views([record]))[0]

    async def update_key(
        self,
        key_id: str,
        *,
        models: Sequence[str] | None = None,
        set_models: bool = False,
        limits: Mapping[str, int | None] | None = None,
    ) -> KeyView:
        """Change a key's models (when `set_models`; empty: every model) and the limits
        named in `limits` (None or DEFAULT_LIMIT: back to the default, 0: none)."""
        changes = {
            name: None if value == DEFAULT_LIMIT else value
            for name, value in (limits or {}).items()
        }
        _check_limits(changes, allow_default=True)
        if await self._store.get_key(key_id) is None:
            raise _no_key(key_id)
        allowed = _models(models) if set_models else None
        await self._store.update_key(key_id, changes, allowed, set_models=set_models)
        self._key_changed(key_id)
        return await self.get_key(key_id)

    async def revoke_key(self, key_id: str, account: str | None = None) -> KeyView:
        """Revoke a key (of `account` only, when given: another's is not found)."""
        record = await self._store.get_key(key_id)
        if record is None or (account is not None and record.account_name != account):
            raise _no_key(key_id)
        await self._store.revoke_key(key_id)
        self._key_changed(key_id)
        return await self.get_key(key_id)

    async def _views(self, records: list[KeyRecord]) -> list[KeyView]:
        last_used = await self._store.keys_last_used([r.id for r in records])
        return [KeyView(r, last_used.get(r.id)) for r in records]

    # An account key's own keys (ImageService)

    async def list_own_keys(self, caller: Caller) -> list[KeyView]:
        return await self.list_keys(caller.account_name)

    async def create_own_key(
        self, caller: Caller, name: str, models: Sequence[str] | None
    ) -> tuple[str, KeyView]:
        """A key for the caller's own account, never wider than the caller's key: its
        models within the caller's allowlist (None: the caller's), its limits the caller's."""
        if models is None:
            wanted = caller.models
        else:
            wanted = _models(models)
            if caller.models is not None:
                if wanted is None:
                    raise ModelNotAllowed(
                        "Your key may not use every model, so it cannot make a key that may."
                    )
                outside = [m for m in wanted if m not in caller.models]
                if outside:
                    raise ModelNotAllowed(
                        f"Your key may not use the model '{outside[0]}', so it cannot make a "
                        "key that may."
                    )
        return await self.create_key(caller.account_name, name, wanted, caller.limits)

    async def revoke_own_key(self, caller: Caller, key_id: str) -> KeyView:
        return await self.revoke_key(key_id, account=caller.account_name)

    # Usage

    async def usage_by_day(self, account: str | None, days: str = "") -> list[UsageBucketRow]:
        """Requests and settled spend by day x model x key x route, over the last `days`
        days counting today (UTC); `days` as the query gave it ("" = the default)."""
        count = _days(days)
        if account and await self._store.get_account(account) is None:
            raise _no_account(account)
        today = int(self._clock() // DAY_S) * DAY_S
        return await self._store.usage_by_day(account or None, today - (count - 1) * DAY_S)

    async def requests(
        self, account: str | None, limit: str = "", after: str = ""
    ) -> tuple[list[AccountUsageRow], bool]:
        """A page of usage records of one account or all, newest first, and whether
        older ones follow; `limit` and `after` as the query gave them."""
        count = page_size(limit)
        if account and await self._store.get_account(account) is None:
            raise _no_account(account)
        try:
            rows = await self._store.recent_usage(account or None, count + 1, after or None)
        except UnknownCursor:
            raise InvalidParameter(
                f"Invalid 'after': {after[:70]!r} is not the id of a usage record.",
                param="after",
            ) from None
        return rows[:count], len(rows) > count

    # Models

    def models(self) -> list[ModelInfo]:
        if self._catalog is None:
            return []
        return model_infos(self._catalog, self._status, self._health())


def _usd(text: str, param: str, *, allow_zero: bool = False) -> int:
    try:
        return credit_micros(text, allow_zero=allow_zero)
    except ValueError as exc:
        raise InvalidParameter(f"Invalid '{param}': {exc}.", param=param) from None


def _days(text: str) -> int:
    if not text:
        return DEFAULT_DAYS
    if not text.isdigit() or not 1 <= int(text) <= MAX_DAYS:
        raise InvalidParameter(
            f"Invalid 'days': {text[:20]!r}. Use a whole number from 1 to {MAX_DAYS}.",
            param="days",
        )
    return int(text)


def _models(models: Sequence[str] | None) -> tuple[str, ...] | None:
    """An allowlist as given; None or empty: every model."""
    if not models:
        return None
    for model in models:
        if not isinstance(model, str) or not model or len(model) > 128:
            raise InvalidParameter(
                "Invalid 'models': give a list of model ids (an empty list for every model).",
                param="models",
            )
    return tuple(dict.fromkeys(models))


def _check_key_name(name: str) -> None:
    if len(name) > MAX_KEY_NAME:
        raise InvalidParameter(f"Invalid 'name': at most {MAX_KEY_NAME} characters.", param="name")


def _check_limits(limits: Mapping[str, int | None], *, allow_default: bool) -> None:
    for name, value in limits.items():
        if name not in LIMIT_FIELDS:
            raise InvalidParameter(f"Unknown key limit {name[:20]!r}.", param="limits")
        if value is not None and (type(value) is not int or value < 0):
            hint = ", or -1 for the default" if allow_default else ""
            raise InvalidParameter(
                f"Invalid 'limits.{name}': {value!r}. Use 0 for no limit or a positive "
                f"whole number{hint}.",
                param=f"limits.{name}",
            )


def _no_account(name: str) -> AccountNotFound:
    return AccountNotFound(f"There is no account named {name[:70]!r}.")


def _no_key(key_id: str) -> KeyNotFound:
    return KeyNotFound(f"There is no key {key_id[:70]}.")
