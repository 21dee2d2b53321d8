"""Idempotency-Key with Stripe's semantics: one execution per (account, key), replayed after.

The claim is an INSERT on the (account, key) primary key, so exactly one request
of any replica wins it; the others find the row. Same request (by a hash of the
canonical request message) and done: its stored outcome is replayed. Same
request still running: they wait for it, polling the shared row, then replay.
Another request under the key: IdempotencyConflict.

What is stored: the outcome of a request that reached execution (the claim
won): its response, or the domain error it ended with (402, upstream failure,
safety refusal, a response too large). Not stored, so the key can be retried:
anything refused before the claim (auth, validation, max n), a rate or
concurrency refusal, a cancelled request (the client left or its deadline
passed), and a bug (500). A response is stored in the same transaction as its
charge (Store.settle), so a charge never lacks its replay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.aio import uninterrupted
from service.errors import (
    ContentPolicy,
    IdempotencyConflict,
    IdempotencyInFlight,
    ImagegateError,
    InsufficientBalance,
    InvalidParameter,
    RateLimited,
    UpstreamError,
)
from service.store.base import Claim, IdempotencyRecord, Store

log = logging.getLogger("imagegate.idempotency")
T = TypeVar("T")
HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
# Token characters: UUIDs, ULIDs, base64 and the like; no spaces, quotes or controls
# (a non-ASCII byte reaches the service as '?' from both fronts, and is refused here).
_KEY_RE = re.compile(r"[A-Za-z0-9._:~+/=@-]+")
# Waiting for a duplicate: first poll soon, then back off to this.
_POLL_FIRST_S = 0.02
_POLL_MAX_S = 0.25
# How often a waiter tries the claim itself (a stopped owner's claim is taken over).
_RECLAIM_EVERY_S = 2.0
# Errors stored as a request's outcome, by reason; others are never stored.
_STORED: dict[str, type[ImagegateError]] = {
    cls.reason: cls for cls in (InvalidParameter, ContentPolicy, InsufficientBalance, UpstreamError)
}


@dataclass(frozen=True)
class Idempotency(Generic[T]):
    """An Idempotency-Key on a request, and how its response is stored and read back."""

    key: str
    # SHA-256 of the RPC name and the request message's deterministic serialization.
    request_hash: bytes
    encode: Callable[[T], bytes]
    decode: Callable[[bytes], T]


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_CHARS or not _KEY_RE.fullmatch(key):
        raise InvalidParameter(
            f"Invalid {HEADER}: use 1 to {MAX_KEY_CHARS} characters from A-Z, a-z, 0-9 "
            "and . _ : ~ + / = @ - (a UUID, for example).",
            param=HEADER,
        )


def error_record(err: ImagegateError) -> str | None:
    """The error as stored, or None if this error is never stored."""
    if isinstance(err, RateLimited) or err.reason not in _STORED:
        return None
    missing = isinstance(err, InvalidParameter) and err.missing
    return json.dumps(
        {"reason": err.reason, "message": err.message, "param": err.param, "missing": missing}
    )


def stored_error(text: str) -> ImagegateError:
    data = json.loads(text)
    cls = _STORED[data["reason"]]
    if cls is InvalidParameter:
        return InvalidParameter(data["message"], param=data["param"], missing=data["missing"])
    if cls is UpstreamError:
        return UpstreamError(data["message"])
    return cls(data["message"], param=data["param"])


class Keeper:
    """Runs a request once per Idempotency-Key of an account, across replicas."""

    def __init__(
        self,
        store: Store,
        lock_s: float,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        # A claim outlives any request that could still finish it.
        self._lock_s = lock_s
        self._owner = owner
        self._clock = clock

    async def once(
        self,
        account_id: int,
        idem: Idempotency[T],
        deadline: float | None,
        run: Callable[[Claim], Awaitable[T]],
    ) -> T:
        """`run` under a won claim (it stores the response with its charge), or the
        stored outcome of the request that won it."""
        claim = await self._claim_or_replay(account_id, idem, deadline)
        if not isinstance(claim, Claim):
            return await _replay(claim, idem)
        try:
            return await run(claim)
        except ImagegateError as err:
            record = error_record(err)
            if record is None:
                await uninterrupted(self._store.abandon_idempotency(claim))
            else:
                await uninterrupted(self._store.finish_idempotency(claim, None, record))
            raise
        except BaseException:
            await uninterrupted(self._store.abandon_idempotency(claim))
            raise

    async def _claim_or_replay(
        self, account_id: int, idem: Idempotency[T], deadline: float | None
    ) -> Claim | IdempotencyRecord:
        while True:
            token = secrets.token_hex(8)
            found = await self._store.claim_idempotency(
                account_id,
                idem.key,
                idem.request_hash,
                self._clock() + self._lock_s,
                token,
                self._owner,
            )
            if found is None:
                return Claim(account_id, idem.key, token)
            if found.request_hash != idem.request_hash:
                raise IdempotencyConflict(
                    f"This {HEADER} was already used with a different request. Use a new key "
                    "for a new request."
                )
            if found.status == "done":
                return found
            done = await self._wait(account_id, idem, deadline)
            if done is not None:
                return done

    async def _wait(
        self, account_id: int, idem: Idempotency[T], deadline: float | None
    ) -> IdempotencyRecord | None:
        """Until the running request ends: its record once done, None to claim again
        (it was abandoned, or it is time to try taking over a stopped owner's claim)."""
        pause = _POLL_FIRST_S
        until = time.monotonic() + _RECLAIM_EVERY_S
        while time.monotonic() < until:
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise IdempotencyInFlight(
                    f"A request with this {HEADER} is still in progress. Retry later to get "
                    "its result."
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)
            found = await self._store.get_idempotency(account_id, idem.key)
            if found is None or found.request_hash != idem.request_hash:
                return None  # abandoned (or swept and reused): try the claim again
            if found.status == "done":
                return found
        return None


async def _replay(record: IdempotencyRecord, idem: Idempotency[T]) -> T:
    if record.error is not None:
        raise stored_error(record.error)
    assert record.response is not None, "a done claim has a response or an error"
    # A stored response may hold whole images: decoded off the event loop.
    return await asyncio.to_thread(idem.decode, record.response)
