"""Found keys are trusted for at most a second: a revocation reaches every replica within it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc

from service import keys
from service.admin import Admin
from service.catalog import load_catalog
from service.core import ImageCore
from service.errors import InvalidApiKey
from service.images import ImageStore
from service.key_cache import KeyCache
from service.store.base import KeyRecord
from service.store.sqlite import SqliteStore
from tests.conftest import store_for
from tests.limits_harness import open_account
from tests.replicas import replicas


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(SqliteStore):
    """The real store, counting the key lookups that reach the database."""

    lookups = 0

    async def find_key(self, key_hash: bytes) -> KeyRecord | None:
        self.lookups += 1
        return await super().find_key(key_hash)


async def _core(tmp_path: Path, store: SqliteStore, cache: KeyCache) -> ImageCore:
    return ImageCore(
        catalog=load_catalog(),
        store=store,
        providers={},
        images=ImageStore(tmp_path / "images", b"secret", 3600),
        default_model="local",
        upstream_timeout_s=1,
        reservation_ttl_s=900,
        key_cache=cache,
    )


async def test_a_found_key_is_read_again_after_the_ttl(tmp_path: Path) -> None:
    clock = Clock()
    store = CountingStore(tmp_path / "db.sqlite")
    await store.open()
    try:
        core = await _core(tmp_path, store, KeyCache(1.0, clock=clock))
        key, key_id = await open_account(store, "a", 1000)
        for _ in range(3):
            assert (await core.authenticate(f"Bearer {key}")).key_id == key_id
        assert store.lookups == 1
        await store.revoke_key(key_id)
        clock.now += 0.999
        await core.authenticate(f"Bearer {key}")  # still within the second it was read
        clock.now += 0.001
        with pytest.raises(InvalidApiKey):
            await core.authenticate(f"Bearer {key}")
        with pytest.raises(InvalidApiKey):
            await core.authenticate(f"Bearer {key}")  # a revoked key is never remembered
        assert store.lookups == 3
    finally:
        await store.close()


async def test_unknown_keys_are_not_remembered(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "db.sqlite")
    await store.open()
    try:
        core = await _core(tmp_path, store, KeyCache(1.0, clock=Clock()))
        await store.create_account("a", 1000)
        key = keys.new_key()
        with pytest.raises(InvalidApiKey):
            await core.authenticate(f"Bearer {key}")
        # Created a moment later: it works at once, not a second later.
        await store.create_key("a", keys.hash_key(key), "p", "", None)
        assert (await core.authenticate(f"Bearer {key}")).account_name == "a"
        assert store.lookups == 2
    finally:
        await store.close()


async def test_a_ttl_over_one_second_is_refused() -> None:
    with pytest.raises(ValueError, match=r"from 0 to 1\.0 s"):
        KeyCache(1.5)


async def test_the_cache_holds_a_bounded_number_of_keys(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "db.sqlite")
    await store.open()
    try:
        core = await _core(tmp_path, store, KeyCache(1.0, max_entries=2, clock=Clock()))
        found = [(await open_account(store, f"a{i}", 1000))[0] for i in range(3)]
        for key in [*found, found[0]]:
            await core.authenticate(f"Bearer {key}")
        # The first was pushed out by the third: read again.
        assert store.lookups == 4
    finally:
        await store.close()


async def _list_models(target: str, key: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        try:
            await stub.ListModels(
                images_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),)
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK


async def test_a_key_revoked_on_one_replica_is_refused_by_the_other_within_a_second(
    database_url: str, tmp_path: Path
) -> None:
    store = store_for(database_url)
    await store.open(migrate=True)
    try:
        key, key_id = await open_account(store, "shared", 1000)
        async with replicas(database_url, tmp_path, 2) as (first, second):
            for replica in (first, second):
                # Read, and remembered, by both.
                assert await _list_models(replica.grpc_target, key) == grpc.StatusCode.OK
            # As `imagegate keys revoke` does it: a write to the shared database only.
            assert await store.revoke_key(key_id)
            await asyncio.sleep(1.05)
            for replica in (first, second):
                assert (
                    await _list_models(replica.grpc_target, key) == grpc.StatusCode.UNAUTHENTICATED
                )
    finally:
        await store.close()


async def test_a_key_revoked_through_this_process_is_refused_at_once(tmp_path: Path) -> None:
    """The admin API tells the cache: no second of grace where the revocation was made."""
    store = CountingStore(tmp_path / "db.sqlite")
    await store.open()
    try:
        cache = KeyCache(1.0, clock=Clock())
        core = await _core(tmp_path, store, cache)
        key, key_id = await open_account(store, "a", 1000)
        other, other_id = await open_account(store, "b", 1000)
        await core.authenticate(f"Bearer {key}")
        await core.authenticate(f"Bearer {other}")
        await Admin(store, key_changed=cache.forget).revoke_key(key_id)
        with pytest.raises(InvalidApiKey):
            await core.authenticate(f"Bearer {key}")
        # Only that key was dropped: the other is still served from the cache.
        assert (await core.authenticate(f"Bearer {other}")).key_id == other_id
        assert store.lookups == 3
    finally:
        await store.close()
