"""One contract for every ledger store: each test runs on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from service import keys
from service.errors import InsufficientBalance
from service.money import MAX_BALANCE_MICROS, MAX_CREDIT_MICROS
from service.store.base import (
    AccountBalance,
    AccountExists,
    Charge,
    Claim,
    Instance,
    KeyLimits,
    Served,
    Store,
    UnknownAccount,
    UnknownCursor,
    new_reservation_id,
)
from tests import pg
from tests.conftest import store_for

CHARGE = Charge("req_1", "key_x", "local", 2, "256x256", "standard")
LATER = 1e12  # an expiry no test reaches

MakeStore = Callable[..., Awaitable[Store]]


class Ticks:
    """A clock that moves one second per reading: every row gets its own timestamp."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
async def make_store(database_url: str) -> AsyncIterator[MakeStore]:
    """Opens stores on one database (several = several replicas), migrated; closes them."""
    opened: list[Store] = []

    async def make(clock: Callable[[], float] | None = None) -> Store:
        store = store_for(database_url, clock or Ticks())
        await store.open(migrate=True)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def _raw(database_url: str, *statements: str) -> None:
    """Change the database behind the store's back, as an old version or an operator might."""
    if database_url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db, db:
            for statement in statements:
                db.execute(statement)
    else:
        await pg.execute(database_url, ";".join(statements))


async def _balance(store: Store, name: str) -> int:
    account = await store.get_account(name)
    assert account is not None
    assert await store.ledger_sum(account.id) == account.balance_micros
    return account.balance_micros


async def test_accounts(make_store: MakeStore) -> None:
    store = await make_store()
    acme = await store.create_account("acme", 2_500_000)
    assert (acme.name, acme.balance_micros) == ("acme", 2_500_000)
    with pytest.raises(AccountExists):
        await store.create_account("acme")
    assert await store.get_account("acme") == acme
    assert await store.get_account("nobody") is None

    topped = await store.add_credit("acme", 750_000, "top-up")
    assert (topped.id, topped.balance_micros) == (acme.id, 3_250_000)
    with pytest.raises(UnknownAccount):
        await store.add_credit("nobody", 1)
    empty = await store.create_account("empty")
    assert empty.balance_micros == 0 and empty.id != acme.id
    assert await store.ledger_sum(empty.id) == 0
    assert await store.ledger_sum(acme.id) == 3_250_000


async def test_keys(make_store: MakeStore) -> None:
    store = await make_store()
    await store.create_account("acme")
    first, second = keys.new_key(), keys.new_key()
    limited = await store.create_key(
        "acme", keys.hash_key(first), keys.display_prefix(first), "ci", ("local", "other")
    )
    assert limited.id.startswith("key_") and limited.account_name == "acme"
    assert (limited.name, limited.models, limited.revoked_at) == ("ci", ("local", "other"), None)
    assert limited.key_hash == keys.hash_key(first)
    anywhere = await store.create_key(
        "acme", keys.hash_key(second), keys.display_prefix(second), "", None
    )
    assert anywhere.models is None

    assert await store.find_key(keys.hash_key(first)) == limited
    assert await store.find_key(keys.hash_key(keys.new_key())) is None
    assert [k.id for k in await store.list_keys("acme")] == [limited.id, anywhere.id]
    assert await store.list_keys("nobody") == []
    with pytest.raises(UnknownAccount):
        await store.create_key("nobody", b"\0" * 32, "sk-x", "", None)

    assert await store.revoke_key(limited.id) is True
    assert await store.revoke_key(limited.id) is False
    assert await store.revoke_key("key_unknown") is False
    found = await store.find_key(keys.hash_key(first))
    assert found is not None and found.revoked_at is not None


async def test_reserve_settle_release_exactly_once(make_store: MakeStore) -> None:
    store = await make_store()
    account = await store.create_account("acme", 10_000)
    first = await store.reserve(account.id, 4_000, CHARGE, LATER)
    assert await _balance(store, "acme") == 6_000
    with pytest.raises(InsufficientBalance, match="too low"):
        await store.reserve(account.id, 6_001, CHARGE, LATER)
    assert await _balance(store, "acme") == 6_000
    second = await store.reserve(account.id, 6_000, CHARGE, LATER)  # exactly the balance
    assert await _balance(store, "acme") == 0

    await store.settle(first, 2_500)
    assert await _balance(store, "acme") == 1_500
    await store.settle(first, 0)
    await store.release(first)
    assert await _balance(store, "acme") == 1_500

    await store.release(second)
    assert await _balance(store, "acme") == 7_500
    await store.release(second)
    await store.settle(second, 100)
    assert await _balance(store, "acme") == 7_500

    third = await store.reserve(account.id, 1_000, CHARGE, LATER)
    with pytest.raises(ValueError, match="outside"):
        await store.settle(third, 1_001)
    assert await _balance(store, "acme") == 6_500  # the bad settle changed nothing
    await store.settle(third, 1_000)  # the whole hold: nothing to refund
    await store.settle("res_unknown", 5)
    assert await _balance(store, "acme") == 6_500

    statuses = [(u.quoted_micros, u.cost_micros, u.status) for u in await store.usage("acme")]
    assert statuses == [
        (1_000, 1_000, "settled"),
        (6_000, 0, "released"),
        (4_000, 2_500, "settled"),
    ]


async def test_release_expired(make_store: MakeStore) -> None:
    store = await make_store()
    account = await store.create_account("acme", 10_000)
    stale = await store.reserve(account.id, 3_000, CHARGE, expires_at=100.0)
    settled = await store.reserve(account.id, 2_000, CHARGE, expires_at=100.0)
    fresh = await store.reserve(account.id, 1_000, CHARGE, expires_at=10_000.0)
    await store.settle(settled, 2_000)

    assert await store.release_expired(now=500.0) == 1
    assert await store.release_expired(now=500.0) == 0
    assert await _balance(store, "acme") == 7_000
    await store.settle(stale, 3_000)  # too late: it was released
    assert await _balance(store, "acme") == 7_000
    await store.settle(fresh, 400)
    assert await _balance(store, "acme") == 7_600
    assert await store.release_expired(now=20_000.0) == 0


async def test_usage(make_store: MakeStore) -> None:
    store = await make_store()
    a = await store.create_account("a", 100_000)
    b = await store.create_account("b", 100_000)
    ids = []
    for i, quality in enumerate(("standard", "hd", "standard")):
        charge = Charge(f"req_{i}", "key_a", "local", i + 1, "512x512", quality)
        ids.append(await store.reserve(a.id, 1_000 * (i + 1), charge, LATER))
    await store.settle(ids[0], 1_000)
    await store.release(ids[1])
    await store.reserve(b.id, 5, CHARGE, LATER)

    rows = await store.usage("a")
    assert [
        (r.request_id, r.n, r.quality, r.quoted_micros, r.cost_micros, r.status) for r in rows
    ] == [
        ("req_2", 3, "standard", 3_000, 0, "held"),
        ("req_1", 2, "hd", 2_000, 0, "released"),
        ("req_0", 1, "standard", 1_000, 1_000, "settled"),
    ]
    assert all(r.model == "local" and r.size == "512x512" for r in rows)
    assert rows[0].created_at > rows[1].created_at > rows[2].created_at
    assert [r.request_id for r in await store.usage("a", limit=2)] == ["req_2", "req_1"]
    assert [r.request_id for r in await store.usage("b")] == ["req_1"]
    assert await store.usage("nobody") == []


async def test_parallel_reserves_never_overspend(make_store: MakeStore) -> None:
    """200 reserves released together on two store instances (two replicas) for 37 holds."""
    price = 1_000
    replicas = [await make_store(), await make_store()]
    account = await replicas[0].create_account("acme", 37 * price)
    go = asyncio.Event()

    async def one(i: int) -> str | None:
        await go.wait()
        try:
            return await replicas[i % 2].reserve(account.id, price, CHARGE, LATER)
        except InsufficientBalance:
            return None

    tasks = [asyncio.create_task(one(i)) for i in range(200)]
    await asyncio.sleep(0)
    go.set()
    held = [r for r in await asyncio.gather(*tasks) if r is not None]
    assert len(held) == 37 == len(set(held))
    assert await _balance(replicas[1], "acme") == 0
    assert len(await replicas[0].usage("acme", limit=500)) == 37


async def test_racing_settle_and_release_resolve_once(make_store: MakeStore) -> None:
    """Two replicas: one settles while the other releases (a crash sweep) the same holds."""
    one, other = await make_store(), await make_store()
    account = await one.create_account("acme", 60 * 1_000)
    held = [await one.reserve(account.id, 1_000, CHARGE, expires_at=100.0) for _ in range(60)]
    go = asyncio.Event()

    async def after_go(call: Awaitable[object]) -> object:
        await go.wait()
        return await call

    racers = []
    for i, rid in enumerate(held):
        racers.append(after_go(one.settle(rid, 600)))
        racers.append(after_go(other.release(rid) if i % 2 else other.settle(rid, 300)))
    racers.append(after_go(other.release_expired(now=500.0)))
    racers.append(after_go(one.release_expired(now=500.0)))
    tasks = [asyncio.create_task(r) for r in racers]  # type: ignore[arg-type]
    await asyncio.sleep(0)
    go.set()
    await asyncio.gather(*tasks)

    rows = await other.usage("acme", limit=100)
    assert len(rows) == 60 and all(r.status in ("settled", "released") for r in rows)
    charged = sum(r.cost_micros for r in rows)
    assert all(r.cost_micros in (600, 300) for r in rows if r.status == "settled")
    assert all(r.cost_micros == 0 for r in rows if r.status == "released")
    # A reservation resolved twice would have been refunded twice: the balance says so.
    assert await _balance(one, "acme") == 60 * 1_000 - charged
    assert await one.release_expired(now=500.0) == 0


async def test_owner_chosen_id_and_route_are_kept(make_store: MakeStore) -> None:
    store = await make_store()
    account = await store.create_account("acme", 10_000)
    rid = new_reservation_id()
    assert (
        await store.reserve(account.id, 4_000, CHARGE, LATER, reservation_id=rid, owner="i1") == rid
    )
    other = await store.reserve(account.id, 1_000, CHARGE, LATER)
    await store.settle(rid, 3_000, Served("openai,azure", "dall-e-3,dall-e-3", 2_800))
    await store.release(other)
    released, settled = await store.usage("acme")
    assert (settled.provider, settled.upstream_model, settled.upstream_cost_micros) == (
        "openai,azure",
        "dall-e-3,dall-e-3",
        2_800,
    )
    assert (released.provider, released.upstream_model, released.upstream_cost_micros) == (
        "",
        "",
        0,
    )
    assert await _balance(store, "acme") == 7_000


@pytest.mark.parametrize("bad", [-1, MAX_CREDIT_MICROS + 1, 1.5])
async def test_credit_guards(make_store: MakeStore, bad: object) -> None:
    store = await make_store()
    await store.create_account("acme", 1)
    with pytest.raises(ValueError):
        await store.add_credit("acme", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.create_account("other", bad)  # type: ignore[arg-type]
    assert await store.get_account("other") is None
    assert await _balance(store, "acme") == 1


async def test_a_balance_stops_at_its_cap(make_store: MakeStore, database_url: str) -> None:
    store = await make_store()
    account = await store.create_account("rich", 0)
    top = MAX_BALANCE_MICROS - 1
    await _raw(
        database_url,
        f"UPDATE accounts SET balance_micros = {top} WHERE id = {account.id}",
        "INSERT INTO ledger (account_id, delta_micros, kind, created_at) "
        f"VALUES ({account.id}, {top}, 'credit', 0)",
    )
    with pytest.raises(ValueError, match="over"):
        await store.add_credit("rich", 2)
    with pytest.raises(UnknownAccount):
        await store.add_credit("nobody", 2)
    assert (await store.add_credit("rich", 1)).balance_micros == MAX_BALANCE_MICROS
    assert await _balance(store, "rich") == MAX_BALANCE_MICROS


async def test_instances_beat_retire(make_store: MakeStore) -> None:
    store = await make_store()
    first = Instance("inst_a", "host", 10, "77", 100.0, 100.0)
    await store.beat(first)
    await store.beat(replace(first, heartbeat_at=160.0, pid=99))  # only the heartbeat moves
    await store.beat(Instance("inst_b", "", 11, "", 120.0, 120.0))
    assert sorted(await store.instances(), key=lambda i: i.id) == [
        replace(first, heartbeat_at=160.0),
        Instance("inst_b", "", 11, "", 120.0, 120.0),
    ]
    await store.retire("inst_a")
    await store.retire("inst_unknown")
    assert [i.id for i in await store.instances()] == ["inst_b"]


async def test_orphans_are_released_once_whichever_replica_finds_them(
    make_store: MakeStore,
) -> None:
    one, other = await make_store(), await make_store()
    account = await one.create_account("acme", 100 * 1_000)
    for name, beat in (("inst_dead", 100.0), ("inst_stale", 100.0), ("inst_live", 1_000.0)):
        await one.beat(Instance(name, "", 1, "", 100.0, beat))
    owners = ["inst_dead", "inst_stale", "inst_live", "inst_gone", None] * 20
    for owner in owners:
        await one.reserve(account.id, 1_000, CHARGE, LATER, owner=owner)

    go = asyncio.Event()

    async def sweep(store: Store, keep: str) -> int:
        await go.wait()
        return await store.release_orphans(["inst_dead"], stale_before=500.0, keep=keep)

    tasks = [asyncio.create_task(sweep(s, "inst_live")) for s in (one, other, one, other)]
    await asyncio.sleep(0)
    go.set()
    released = await asyncio.gather(*tasks)
    # dead, stale and gone owners: 3 x 20 reservations, each released by one sweep.
    assert sum(released) == 60
    assert [i.id for i in await other.instances()] == ["inst_live"]
    rows = await one.usage("acme", limit=200)
    assert sum(r.status == "released" for r in rows) == 60
    assert sum(r.status == "held" for r in rows) == 40  # the live owner's and the unowned
    assert await _balance(one, "acme") == 60 * 1_000


# Key limits, balance, usage pages and Idempotency-Key claims (migration 0004).


async def test_key_limits(make_store: MakeStore) -> None:
    store = await make_store()
    await store.create_account("acme")
    plain = await store.create_key("acme", keys.hash_key(keys.new_key()), "p", "", None)
    assert plain.limits == KeyLimits()
    limited = await store.create_key(
        "acme", keys.hash_key(keys.new_key()), "p", "", None, KeyLimits(rpm=5, max_n=0)
    )
    assert limited.limits == KeyLimits(rpm=5, max_n=0)
    changed = await store.update_key(limited.id, {"rpm": None, "ipm": 7, "concurrency": 2})
    assert changed is not None and changed.limits == KeyLimits(None, 7, 2, 0)
    assert (await store.find_key(limited.key_hash)) == changed
    assert [k.limits for k in await store.list_keys("acme")] == [KeyLimits(), changed.limits]
    assert await store.update_key("key_missing", {"rpm": 1}) is None
    for bad in ({"rpm": -1}, {"rpm": 1.5}, {"name": 1}):
        with pytest.raises(ValueError):
            await store.update_key(limited.id, bad)  # type: ignore[arg-type]


async def test_balance_counts_what_is_held(make_store: MakeStore) -> None:
    store = await make_store()
    acme = await store.create_account("acme", 1_000_000)
    held = await store.reserve(acme.id, 300_000, CHARGE, LATER)
    await store.reserve(acme.id, 200_000, CHARGE, LATER)
    assert await store.balance(acme.id) == AccountBalance(500_000, 500_000)
    await store.settle(held, 100_000)
    assert await store.balance(acme.id) == AccountBalance(700_000, 200_000)
    with pytest.raises(UnknownAccount):
        await store.balance(acme.id + 1000)


async def test_usage_pages_latency_and_key(make_store: MakeStore) -> None:
    # A fixed clock: every row has one timestamp, so insertion order alone sorts them.
    store = await make_store(clock=lambda: 5000.0)
    acme = await store.create_account("acme", 1_000_000)
    other = await store.create_account("other", 1_000_000)
    ids = [await store.reserve(acme.id, 1000, CHARGE, LATER) for _ in range(5)]
    theirs = await store.reserve(other.id, 1000, CHARGE, LATER)
    newest_first = ids[::-1]
    assert [r.id for r in await store.usage("acme", 10)] == newest_first
    page, after = [], None
    while rows := await store.usage("acme", 2, after):
        page += [r.id for r in rows]
        after = rows[-1].id
    assert page == newest_first
    with pytest.raises(UnknownCursor):
        await store.usage("acme", 2, theirs)
    row = (await store.usage("acme", 1))[0]
    assert (row.key_id, row.latency_ms, row.status) == (CHARGE.key_id, None, "held")

    ticking = await make_store(clock=Ticks(9000.0))
    timed = await ticking.reserve(acme.id, 1000, CHARGE, LATER)
    await ticking.settle(timed, 1000)  # one tick (1 s) later
    assert (await ticking.usage("acme", 1))[0].latency_ms == 1000


async def test_idempotency_claims(make_store: MakeStore) -> None:
    store = await make_store()
    acme = await store.create_account("acme")
    other = await store.create_account("other")
    assert await store.claim_idempotency(acme.id, "k", b"h1", LATER, "t1") is None
    running = await store.claim_idempotency(acme.id, "k", b"h1", LATER, "t2")
    assert running is not None and (running.status, running.request_hash) == ("running", b"h1")
    # Per account: another account's same key is its own.
    assert await store.claim_idempotency(other.id, "k", b"h1", LATER, "t3") is None
    # Only the claim's own token finishes or abandons it.
    await store.finish_idempotency(Claim(acme.id, "k", "t2"), b"stale", None)
    await store.abandon_idempotency(Claim(acme.id, "k", "t2"))
    assert (await store.get_idempotency(acme.id, "k")) == running
    await store.finish_idempotency(Claim(acme.id, "k", "t1"), b"response", None)
    done = await store.claim_idempotency(acme.id, "k", b"h1", LATER, "t4")
    assert done is not None and (done.status, done.response, done.error) == (
        "done",
        b"response",
        None,
    )
    # A done key is never taken over or abandoned; a different request sees the row.
    await store.abandon_idempotency(Claim(acme.id, "k", "t1"))
    other_request = await store.claim_idempotency(acme.id, "k", b"h2", LATER, "t5")
    assert other_request is not None and other_request.request_hash == b"h1"
    # An abandoned claim frees the key.
    assert await store.claim_idempotency(acme.id, "gone", b"h", LATER, "t6") is None
    await store.abandon_idempotency(Claim(acme.id, "gone", "t6"))
    assert await store.get_idempotency(acme.id, "gone") is None
    assert await store.claim_idempotency(acme.id, "gone", b"h", LATER, "t7") is None
    await store.finish_idempotency(Claim(acme.id, "gone", "t7"), None, '{"reason": "X"}')
    failed = await store.get_idempotency(acme.id, "gone")
    assert failed is not None and (failed.response, failed.error) == (None, '{"reason": "X"}')


async def test_idempotency_takeover_of_a_lapsed_or_orphaned_claim(make_store: MakeStore) -> None:
    store = await make_store()  # Ticks: "now" passes 1000 at once
    acme = await store.create_account("acme")
    assert await store.claim_idempotency(acme.id, "lapsed", b"h", 1000.0, "t1") is None
    # Another request under the key never takes over, lapsed or not.
    assert await store.claim_idempotency(acme.id, "lapsed", b"x", LATER, "t2") is not None
    assert await store.claim_idempotency(acme.id, "lapsed", b"h", LATER, "t3") is None
    await store.finish_idempotency(Claim(acme.id, "lapsed", "t1"), b"too late", None)
    found = await store.get_idempotency(acme.id, "lapsed")
    assert found is not None and found.status == "running"  # t1 lost its claim

    live = Instance("inst_live", "h", 1, "", 1.0, 1.0)
    await store.beat(live)
    assert await store.claim_idempotency(acme.id, "owned", b"h", LATER, "t1", "inst_live") is None
    assert await store.claim_idempotency(acme.id, "owned", b"h", LATER, "t2") is not None
    assert await store.claim_idempotency(acme.id, "dead", b"h", LATER, "t1", "inst_gone") is None
    assert await store.claim_idempotency(acme.id, "dead", b"h", LATER, "t2", "inst_live") is None


async def test_one_claim_wins_across_replicas(make_store: MakeStore) -> None:
    replicas = [await make_store(), await make_store()]
    acme = await replicas[0].create_account("acme")
    results = await asyncio.gather(
        *(
            replicas[i % 2].claim_idempotency(acme.id, "race", b"h", LATER, f"t{i}")
            for i in range(20)
        )
    )
    assert sum(r is None for r in results) == 1


async def test_settle_stores_the_response_with_the_charge(make_store: MakeStore) -> None:
    store = await make_store()
    acme = await store.create_account("acme", 1_000_000)
    assert await store.claim_idempotency(acme.id, "k", b"h", LATER, "t") is None
    held = await store.reserve(acme.id, 5000, CHARGE, LATER)
    with pytest.raises(ValueError):  # a bad cost: neither the charge nor the response
        await store.settle(held, 9999, done=(Claim(acme.id, "k", "t"), b"reply"))
    found = await store.get_idempotency(acme.id, "k")
    assert found is not None and found.status == "running"
    await store.settle(held, 4000, done=(Claim(acme.id, "k", "t"), b"reply"))
    found = await store.get_idempotency(acme.id, "k")
    assert found is not None and (found.status, found.response) == ("done", b"reply")
    assert await _balance(store, "acme") == 996_000


async def test_sweep_idempotency(make_store: MakeStore) -> None:
    clock = Ticks(100.0)
    store = await make_store(clock=clock)
    acme = await store.create_account("acme")
    await store.claim_idempotency(acme.id, "old", b"h", LATER, "t")
    cut = clock.now + 0.5
    await store.claim_idempotency(acme.id, "new", b"h", LATER, "t")
    assert await store.sweep_idempotency(cut) == 1
    assert await store.get_idempotency(acme.id, "old") is None
    assert await store.get_idempotency(acme.id, "new") is not None
