"""Per-key limits (OWASP API4): requests and images per minute, requests in flight, n.

Rates use the `limits` library's moving window (exact: a minute is any 60 s), on
Redis when a URL is configured, so that every replica counts against one window,
else in this process. Requests in flight are leases (service/leases.py). A
request over a limit is refused before anything is reserved; a limit that no
request could ever meet (n over max_n or over the images per minute) is a 400.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from service.aio import uninterrupted
from service.errors import InvalidParameter, RateLimited
from service.leases import Leases, LocalLeases, RedisLeases
from service.store.base import KeyLimits

log = logging.getLogger("imagegate.limits")
# A full concurrency slot frees when some request ends: a second is a fair guess.
CONCURRENCY_RETRY_AFTER_S = 1
REDIS_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Limits:
    """Limits in force for one key; 0: none."""

    rpm: int = 0
    ipm: int = 0
    concurrency: int = 0
    max_n: int = 0


def in_force(key: KeyLimits, defaults: Limits) -> Limits:
    """The key's own values where it has them, the configured defaults elsewhere."""
    return Limits(
        rpm=defaults.rpm if key.rpm is None else key.rpm,
        ipm=defaults.ipm if key.ipm is None else key.ipm,
        concurrency=defaults.concurrency if key.concurrency is None else key.concurrency,
        max_n=defaults.max_n if key.max_n is None else key.max_n,
    )


def check_n(limits: Limits, n: int) -> None:
    """n that this key can never be served: a 400 naming `n`, not a 429 to retry."""
    if limits.max_n and n > limits.max_n:
        raise InvalidParameter(
            f"Invalid 'n': {n}. This API key may ask for at most {limits.max_n} "
            f"image{'s' if limits.max_n > 1 else ''} per request.",
            param="n",
        )
    if limits.ipm and n > limits.ipm:
        raise InvalidParameter(
            f"Invalid 'n': {n}. This API key may make at most {limits.ipm} "
            f"image{'s' if limits.ipm > 1 else ''} per minute.",
            param="n",
        )


class Limiter:
    """Admits a key's requests within its limits; shared through Redis when configured."""

    def __init__(self, redis_url: str = "", prefix: str = "imagegate") -> None:
        self._redis_url = redis_url
        self._prefix = prefix
        self._storage: Storage
        self._leases: Leases
        if redis_url:
            try:
                import redis.asyncio
            except ImportError:
                raise ValueError(
                    "IMAGEGATE_REDIS_URL needs the redis package: pip install 'imagegate[redis]'"
                ) from None
            # Bounded waits: a Redis that stops answering admits requests (logged)
            # rather than holding them.
            self._pool = redis.asyncio.ConnectionPool.from_url(
                redis_url,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                socket_timeout=REDIS_TIMEOUT_S,
            )
            self._storage = RedisStorage(
                _limits_uri(redis_url),
                implementation="redispy",
                key_prefix=f"{prefix}:rate",
                # One pool for rates and leases, closed in close(); limits' own
                # annotation of **options is narrower than what it passes on.
                connection_pool=self._pool,  # type: ignore[arg-type]
                wrap_exceptions=True,
            )
            self._leases = RedisLeases(redis.asyncio.Redis(connection_pool=self._pool), prefix)
        else:
            self._storage = MemoryStorage()
            self._leases = LocalLeases()
        self._window = MovingWindowRateLimiter(self._storage)

    @property
    def shared(self) -> bool:
        return bool(self._redis_url)

    async def open(self) -> None:
        await self._leases.open()

    async def close(self) -> None:
        await self._leases.close()
        if self._redis_url:
            await self._pool.aclose()
        elif isinstance(self._storage, MemoryStorage) and self._storage.timer is not None:
            self._storage.timer.cancel()
            with contextlib.suppress(BaseException):
                await self._storage.timer

    @contextlib.asynccontextmanager
    async def admit(self, key_id: str, limits: Limits, n: int) -> AsyncIterator[None]:
        """Hold a slot for one request of `n` images, or raise RateLimited (Retry-After)."""
        lease = None
        if limits.concurrency:
            lease = await self._leases.acquire(key_id, limits.concurrency)
            if lease is None:
                raise RateLimited(
                    f"This API key has {limits.concurrency} request"
                    f"{'s' if limits.concurrency > 1 else ''} in progress, its limit. "
                    "Retry when one has finished.",
                    retry_after_s=CONCURRENCY_RETRY_AFTER_S,
                )
        try:
            await self._hit_rates(key_id, limits, n)
            yield
        finally:
            if lease is not None:
                await uninterrupted(self._leases.release(key_id, lease))

    async def in_flight(self, key_id: str) -> int:
        """Requests of the key holding a concurrency slot now, across replicas if shared."""
        return await self._leases.in_flight(key_id)

    async def _hit_rates(self, key_id: str, limits: Limits, n: int) -> None:
        rates = [
            (RateLimitItemPerMinute(limit, namespace=name), cost, what)
            for name, limit, cost, what in (
                ("rpm", limits.rpm, 1, "requests"),
                ("ipm", limits.ipm, n, "images"),
            )
            if limit
        ]
        # All tested before any is counted, so a refused request rarely uses up a rate.
        for item, cost, what in rates:
            if not await self._allowed(self._window.test, item, key_id, cost):
                await self._refuse(item, key_id, what)
        for item, cost, what in rates:
            if not await self._allowed(self._window.hit, item, key_id, cost):
                await self._refuse(item, key_id, what)

    async def _allowed(
        self, check: Callable[..., Awaitable[bool]], item: RateLimitItem, key_id: str, cost: int
    ) -> bool:
        try:
            return bool(await check(item, key_id, cost=cost))
        except Exception:
            # Redis unreachable: serve unlimited rather than refuse everyone; the
            # balance still bounds what any key can spend.
            log.warning("rate limit storage failed; request admitted", exc_info=True)
            return True

    async def _refuse(self, item: RateLimitItem, key_id: str, what: str) -> None:
        try:
            stats = await self._window.get_window_stats(item, key_id)
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        except Exception:
            retry_after = 60
        raise RateLimited(
            f"Rate limit reached for this API key: {item.amount} {what} per minute. "
            f"Retry after {retry_after} s.",
            retry_after_s=retry_after,
        )


def _limits_uri(redis_url: str) -> str:
    """`limits` names its async Redis storage async+redis://..."""
    return "async+" + redis_url
