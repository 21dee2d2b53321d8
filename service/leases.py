"""Requests in flight per key: a counter in this process, or leases in Redis for replicas.

A Redis lease is a member of a sorted set per key, scored by when it expires on
Redis's own clock (no replica's clock matters). This process renews its leases
every LEASE_TTL_S / 3 while their requests run, so a replica that dies without
releasing them frees its slots within LEASE_TTL_S; a request that ends, however
it ends, releases its lease at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter
from typing import Any, Protocol

log = logging.getLogger("imagegate.limits")
LEASE_TTL_S = 30.0

# KEYS[1] the key's set; ARGV: limit, lease id, ttl ms. Expired leases are dropped
# first, then the lease is added if the set has room. 1 if added.
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
# KEYS[1] the key's set; ARGV: ttl ms, then the lease ids still running.
_RENEW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 0
"""


class Leases(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(self, key_id: str, limit: int) -> str | None:
        """A lease id if fewer than `limit` requests of the key are in flight, else None."""
        ...

    async def release(self, key_id: str, lease: str) -> None: ...

    async def in_flight(self, key_id: str) -> int:
        """How many of the key's leases are held now (by every replica)."""
        ...


class LocalLeases:
    """One process: a plain counter (the event loop is the only writer)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def acquire(self, key_id: str, limit: int) -> str | None:
        if self.counts[key_id] >= limit:
            return None
        self.counts[key_id] += 1
        return key_id

    async def release(self, key_id: str, lease: str) -> None:
        self.counts[key_id] -= 1
        if self.counts[key_id] <= 0:
            del self.counts[key_id]

    async def in_flight(self, key_id: str) -> int:
        return self.counts[key_id]


class RedisLeases:
    """Replicas: leases in Redis with a TTL, renewed while held."""

    def __init__(self, client: Any, prefix: str, ttl_s: float = LEASE_TTL_S) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_ms = int(ttl_s * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        # Redis key -> this process's leases on it.
        self._held: dict[str, set[str]] = {}
        self._renewer: asyncio.Task[None] | None = None

    def key(self, key_id: str) -> str:
        return f"{self._prefix}:inflight:{key_id}"

    async def open(self) -> None:
        self._renewer = asyncio.create_task(self._renew_forever())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

    async def acquire(self, key_id: str, limit: int) -> str | None:
        lease = secrets.token_hex(8)
        key = self.key(key_id)
        try:
            added = await self._acquire(keys=[key], args=[limit, lease, self._ttl_ms])
        except Exception:
            # As for rates: Redis down admits rather than refuses (logged).
            log.warning("concurrency storage failed; request admitted", exc_info=True)
            return ""
        if not added:
            return None
        self._held.setdefault(key, set()).add(lease)
        return lease

    async def release(self, key_id: str, lease: str) -> None:
        if not lease:
            return  # admitted while Redis was down: nothing to release
        key = self.key(key_id)
        held = self._held.get(key, set())
        held.discard(lease)
        if not held:
            self._held.pop(key, None)
        try:
            await self._client.zrem(key, lease)
        except Exception:
            log.warning("could not release a lease; it expires by itself", exc_info=True)

    async def in_flight(self, key_id: str) -> int:
        key = self.key(key_id)
        now_s, now_us = await self._client.time()
        # Unexpired leases only: a stopped replica's count until they lapse.
        return int(await self._client.zcount(key, now_s * 1000 + now_us // 1000, "+inf"))

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            for key, leases in list(self._held.items()):
                if not leases:
                    continue
                try:
                    await self._renew(keys=[key], args=[self._ttl_ms, *leases])
                except Exception:
                    log.warning("could not renew leases", exc_info=True)
