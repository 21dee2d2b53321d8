"""Property: whatever sequence of credits, reserves and resolutions, the books balance."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import InsufficientBalance
from service.store.base import Charge
from service.store.sqlite import SqliteStore

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


async def _check(ops: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "db.sqlite", clock=lambda: 1000.0)
        await store.open()
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_balance_always_equals_ledger_and_never_goes_negative(
    ops: list[tuple[object, ...]],
) -> None:
    asyncio.run(_check(ops))
