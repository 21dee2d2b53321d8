"""Keys at rest: only hashes in the database, never the key text."""

from __future__ import annotations

import hashlib
import re

from tests.conftest import Stack, make_tenant


async def test_database_holds_hashes_not_keys(stack: Stack) -> None:
    tenants = [await make_tenant(stack.service) for _ in range(3)]
    db = stack.service.config.sqlite_path
    # WAL mode: recent writes may live in the -wal file, so read both.
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    for tenant in tenants:
        assert tenant.key.encode() not in raw
        assert tenant.key[3:].encode() not in raw  # not even without the prefix
        assert hashlib.sha256(tenant.key.encode()).digest() in raw
    # Display prefixes ("sk-abcd...wxyz") are stored; nothing key-length is.
    assert not re.search(rb"sk-[A-Za-z0-9_-]{12}", raw)
