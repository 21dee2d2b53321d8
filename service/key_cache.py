"""Recently found API keys, kept at most a second, so a request skips the database.

Revoking a key (or changing its models or limits) is a database write made by
any process, often the CLI: no message reaches the replicas. A key's record is
therefore trusted for at most `ttl_s` (1 s at most) after it was read, on every
replica alike, and unknown keys are never remembered (a key created now works at
once). Entries are looked up by the key's SHA-256, as the database does.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from service.store.base import KeyRecord

# The longest a revocation may take to reach every replica.
MAX_TTL_S = 1.0


class KeyCache:
    def __init__(
        self,
        ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= ttl_s <= MAX_TTL_S:
            raise ValueError(f"key cache TTL must be from 0 to {MAX_TTL_S} s, not {ttl_s}")
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._found: OrderedDict[bytes, tuple[float, KeyRecord]] = OrderedDict()

    def get(self, digest: bytes) -> KeyRecord | None:
        """The record read less than ttl_s ago, or None (look it up)."""
        entry = self._found.get(digest)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            del self._found[digest]
            return None
        return entry[1]

    def put(self, digest: bytes, record: KeyRecord, read_at: float) -> None:
        """Remember `record`, read from the database at `read_at` (taken before the read)."""
        if self._ttl_s <= 0:
            return
        self._found[digest] = (read_at + self._ttl_s, record)
        self._found.move_to_end(digest)
        while len(self._found) > self._max:
            self._found.popitem(last=False)

    def forget(self, key_id: str) -> None:
        """Drop the key with this id: a change made through this process (the admin
        API) takes effect here at once; other replicas see it within ttl_s."""
        for digest in [d for d, (_, record) in self._found.items() if record.id == key_id]:
            del self._found[digest]

    def now(self) -> float:
        return self._clock()
