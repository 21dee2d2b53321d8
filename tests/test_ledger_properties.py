"""Property: whatever sequence of credits, reserves and resolutions, the books balance."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import InsufficientBalance
from service.store.base import Charge
from tests import pg
from tests.conftest import store_for

CHARGE = Charge("r", "k", "local", 1, "256x256", "standard")

# An operation: ("credit", amount) | ("reserve", amount) | ("settle", index, cost_fraction)
# | ("release", index) | ("expire",)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("credit"), st.integers(1, 5000)),
        st.tuples(st.just("reserve"), st.integers(1, 5000)),
        st.tuples(st.just("settle"), st.integers(0, 20), st.integers(0, 4)),
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("expire")),
    ),
    max_size=40,
)


async def _check(ops: list[tuple[object, ...]], postgres_server: str | None) -> None:
    """One fresh database per example: a SQLite file, or a PostgreSQL schema."""
    if postgres_server is None:
        with tempfile.TemporaryDirectory() as tmp:
            await _run(ops, f"sqlite:///{Path(tmp) / 'db.sqlite'}")
        return
    name, url = await pg.create_schema(postgres_server)
    try:
        await _run(ops, url)
    finally:
        await pg.drop_schema(postgres_server, name)


async def _run(ops: list[tuple[object, ...]], database_url: str) -> None:
    store = store_for(database_url, clock=lambda: 1000.0)
    await store.open(migrate=True)
    try:
        account = await store.create_account("a", 1000)
        held: dict[str, int] = {}  # reservation -> amount, while held
        reservations: list[str] = []
        expected = 1000
        for op in ops:
            kind = op[0]
            if kind == "credit":
                await store.add_credit("a", int(op[1]))  # type: ignore[call-overload]
                expected += int(op[1])  # type: ignore[call-overload]
            elif kind == "reserve":
                amount = int(op[1])  # type: ignore[call-overload]
                try:
                    rid = await store.reserve(account.id, amount, CHARGE, expires_at=2000.0)
                except InsufficientBalance:
                    assert amount > expected
                    continue
                expected -= amount
                held[rid] = amount
                reservations.append(rid)
            elif kind in ("settle", "release") and reservations:
                rid = reservations[int(op[1]) % len(reservations)]  # type: ignore[call-overload]
                amount = held.pop(rid, None)
                cost = 0
                if amount is not None and kind == "settle":
                    cost = amount * int(op[2]) // 4  # type: ignore[call-overload]
                if kind == "settle":
                    await store.settle(rid, cost if amount is not None else 0)
                else:
                    await store.release(rid)
                if amount is not None:  # only the first resolution moves money
                    expected += amount - cost
            elif kind == "expire":
                released = await store.release_expired(now=3000.0)
                assert released == len(held)
                expected += sum(held.values())
                held.clear()
            now = await store.get_account("a")
            assert now is not None
            assert now.balance_micros == expected >= 0
            assert await store.ledger_sum(account.id) == expected
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_balance_always_equals_ledger_and_never_goes_negative(
    kind: str, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue("postgres_server") if kind == "postgres" else None

    # Fewer examples on PostgreSQL: each one creates and drops a schema.
    @settings(
        max_examples=60 if server is None else 25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(operations)
    def check(ops: list[tuple[object, ...]]) -> None:
        asyncio.run(_check(ops, server))

    check()
