"""The admin API's store methods, each on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service import keys
from service.admin import Admin
from service.errors import AccountNotFound, InvalidApiKey, InvalidParameter, KeyNotFound
from service.store.base import (
    Charge,
    KeyLimits,
    Served,
    Store,
    UnknownCursor,
    UsageBucketRow,
)
from tests.conftest import store_for
from tests.test_store_contract import LATER, Ticks

DAY = 86400.0
# 2026-11-24 23:59:50 UTC: the clock ticks one second per reading, over midnight.
START = 1_795_564_790.0


@pytest.fixture
def clock() -> Ticks:
    return Ticks(START)


@pytest.fixture
async def store(database_url: str, clock: Ticks) -> AsyncIterator[Store]:
    store = store_for(database_url, clock)
    await store.open(migrate=True)
    yield store
    await store.close()


async def _key(store: Store, account: str, models: tuple[str, ...] | None = None) -> str:
    key = keys.new_key()
    record = await store.create_key(
        account, keys.hash_key(key), keys.display_prefix(key), "k", models
    )
    return record.id


async def _request(
    store: Store, account_id: int, key_id: str, amount: int, cost: int | None, n: int = 1
) -> str:
    """A request held for `amount`, then charged `cost` (None: released)."""
    charge = Charge(f"req-{amount}-{cost}", key_id, "local", n, "256x256", "standard")
    reservation = await store.reserve(account_id, amount, charge, LATER)
    if cost is None:
        await store.release(reservation)
    else:
        await store.settle(reservation, cost, Served("mine", "local", cost // 2))
    return reservation


async def test_no_admin_key_exists_by_default(store: Store) -> None:
    assert await store.list_admin_keys() == []
    with pytest.raises(InvalidApiKey):
        await Admin(store).authenticate("Bearer sk-admin-" + "x" * 43)


async def test_admin_keys_hashed_found_revoked(store: Store) -> None:
    admin = Admin(store)
    key, record = await admin.create_admin_key("ops")
    assert key.startswith("sk-admin-") and len(key) == 9 + 43
    assert record.key_hash == keys.hash_key(key) and key not in repr(record)
    assert record.prefix == key[:13] + "..." + key[-4:]
    assert await store.find_admin_key(keys.hash_key(key)) == record
    assert (await admin.authenticate(f"Bearer {key}")).id == record.id
    assert [r.id for r in await store.list_admin_keys()] == [record.id]
    assert await store.revoke_admin_key(record.id) is True
    assert await store.revoke_admin_key(record.id) is False
    with pytest.raises(InvalidApiKey):
        await admin.authenticate(f"Bearer {key}")
    with pytest.raises(KeyNotFound):
        await admin.revoke_admin_key(record.id)
    listed = await store.list_admin_keys()
    assert listed[0].revoked_at is not None


async def test_accounts_with_held_and_the_ledger(store: Store) -> None:
    b = await store.create_account("bee", 5_000)
    a = await store.create_account("ant", 10_000)
    key_id = await _key(store, "ant")
    await _request(store, a.id, key_id, 3_000, 1_000)
    await store.add_credit("ant", 500, "top-up")
    held = await store.reserve(
        a.id, 2_000, Charge("req-h", key_id, "local", 1, "256x256", "standard"), LATER
    )
    accounts = await store.list_accounts()
    assert [(x.name, x.balance_micros, x.held_micros) for x in accounts] == [
        ("ant", 10_000 - 1_000 + 500 - 2_000, 2_000),
        ("bee", 5_000, 0),
    ]
    assert accounts[1].id == b.id
    ledger = await store.ledger(a.id)
    assert [(e.kind, e.amount_micros, e.balance_micros, e.note) for e in ledger] == [
        ("reserve", -2_000, 7_500, ""),
        ("credit", 500, 9_500, "top-up"),
        ("refund", 2_000, 9_000, ""),
        ("reserve", -3_000, 7_000, ""),
        ("credit", 10_000, 10_000, "initial credit"),
    ]
    assert ledger[0].request_id == "req-h" and ledger[2].request_id == "req-3000-1000"
    assert ledger[0].balance_micros == accounts[0].balance_micros
    assert sum(e.amount_micros for e in ledger) == await store.ledger_sum(a.id)
    # The newest entries, with the running balance of the whole ledger.
    assert await store.ledger(a.id, limit=2) == ledger[:2]
    await store.release(held)


async def test_keys_models_all_keys_and_last_use(store: Store) -> None:
    a = await store.create_account("ant", 10_000)
    await store.create_account("bee", 0)
    used, unused = await _key(store, "ant", ("local",)), await _key(store, "ant")
    theirs = await _key(store, "bee")
    await _request(store, a.id, used, 1_000, 1_000)
    last = await store.keys_last_used([used, unused, theirs, "key_missing"])
    assert list(last) == [used] and last[used] > START
    assert await store.keys_last_used([]) == {}
    assert [k.id for k in await store.all_keys()] == [used, unused, theirs]
    changed = await store.update_key(unused, {"rpm": 5}, ("a", "b"), set_models=True)
    assert changed is not None and (changed.models, changed.limits.rpm) == (("a", "b"), 5)
    limits_only = await store.update_key(unused, {"rpm": None, "ipm": 0})
    assert limits_only is not None and limits_only.models == ("a", "b")
    assert (limits_only.limits.rpm, limits_only.limits.ipm) == (None, 0)
    cleared = await store.update_key(unused, {}, None, set_models=True)
    assert cleared is not None and cleared.models is None and cleared.limits.ipm == 0
    assert await store.update_key("key_missing", {"rpm": 1}) is None
    with pytest.raises(ValueError):
        await store.update_key(unused, {"models; DROP TABLE api_keys": 1})
    got = await store.get_key(used)
    assert got is not None and got.account_name == "ant"
    assert await store.get_key("key_missing") is None


async def test_usage_by_day_is_summed_in_the_database(store: Store, clock: Ticks) -> None:
    a = await store.create_account("ant", 100_000)
    b = await store.create_account("bee", 100_000)
    ka, kb = await _key(store, "ant"), await _key(store, "bee")
    # START is ten seconds before midnight; each store call reads the clock at least once.
    await _request(store, a.id, ka, 2_000, 2_000, n=2)
    await _request(store, a.id, ka, 1_000, None)
    clock.now = START + 20  # the next day
    await _request(store, a.id, ka, 3_000, 3_000, n=3)
    await _request(store, b.id, kb, 1_000, 1_000)
    buckets = await store.usage_by_day("ant", START - DAY)
    assert buckets == [
        UsageBucketRow("2026-11-24", "local", ka, "", "", 1, 0, 0),
        UsageBucketRow("2026-11-24", "local", ka, "mine", "local", 1, 2, 2_000),
        UsageBucketRow("2026-11-25", "local", ka, "mine", "local", 1, 3, 3_000),
    ]
    everyone = await store.usage_by_day(None, START + 15)
    # Ordered by day, model, key id (random): both keys, in id order.
    assert [(x.day, x.key_id, x.spend_micros) for x in everyone] == sorted(
        [("2026-11-25", ka, 3_000), ("2026-11-25", kb, 1_000)]
    )
    assert await store.usage_by_day("nobody", 0) == []


async def test_recent_usage_across_accounts(store: Store) -> None:
    a = await store.create_account("ant", 100_000)
    b = await store.create_account("bee", 100_000)
    ka, kb = await _key(store, "ant"), await _key(store, "bee")
    first = await _request(store, a.id, ka, 1_000, 1_000)
    second = await _request(store, b.id, kb, 2_000, 2_000)
    third = await _request(store, a.id, ka, 3_000, None)
    rows = await store.recent_usage(None, 10)
    assert [(r.account, r.row.id) for r in rows] == [
        ("ant", third),
        ("bee", second),
        ("ant", first),
    ]
    assert rows[1].row.provider == "mine" and rows[0].row.status == "released"
    older = await store.recent_usage(None, 10, after=second)
    assert [r.row.id for r in older] == [first]
    mine = await store.recent_usage("ant", 1)
    assert [r.row.id for r in mine] == [third]
    assert [r.row.id for r in await store.recent_usage("ant", 5, after=third)] == [first]
    with pytest.raises(UnknownCursor):
        await store.recent_usage("ant", 5, after=second)  # bee's record
    with pytest.raises(UnknownCursor):
        await store.recent_usage(None, 5, after="res_nope")


async def test_admin_operations_refuse_bad_input(store: Store) -> None:
    admin = Admin(store)
    await admin.create_account("ant", "1")
    for call in (
        admin.credit("ant", "-1"),
        admin.credit("ant", "1e400"),
        admin.create_account("bad name"),
        admin.create_account("x" * 65),
        admin.create_key("ant", limits=KeyLimits(rpm=-1)),
        admin.create_key("ant", "n" * 65),
        admin.usage_by_day("ant", "0"),
        admin.requests("ant", "0"),
    ):
        with pytest.raises(InvalidParameter):
            await call
    for call in (admin.credit("nobody", "1"), admin.create_key("nobody"), admin.list_keys("x")):
        with pytest.raises(AccountNotFound):
            await call
    for call in (admin.update_key("key_nope"), admin.revoke_key("key_nope"), admin.get_key("k")):
        with pytest.raises(KeyNotFound):
            await call
