"""The domain core with plain asyncio: settlement, release on failure, recovery after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import pytest

from service import keys
from service.catalog import load_catalog
from service.core import Generation, ImageCore, RequestContext
from service.errors import ContentPolicy, InsufficientBalance, UpstreamError
from service.images import ImageStore
from service.providers.base import GeneratedImage, ProviderResult, UpstreamCall
from service.requests import GenerationParams, ImageRequest
from service.store.base import Charge
from service.store.sqlite import SqliteStore

PNG = b"\x89PNG fake"


class ScriptedProvider:
    """A provider whose next answer the test sets: images, an error, or a wait."""

    id = "local"
    kind = "local"

    def __init__(self) -> None:
        self.calls: list[ImageRequest] = []
        self.images_returned: int | None = None
        self.error: Exception | None = None
        self.delay_s = 0.0

    def max_n(self, upstream_model: str) -> int:
        return 10

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        request = call.request
        self.calls.append(request)
        await asyncio.sleep(self.delay_s)
        if self.error:
            raise self.error
        count = call.n if self.images_returned is None else self.images_returned
        return ProviderResult([GeneratedImage(PNG, "image/png") for _ in range(count)])

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def parts(tmp_path: Path):  # type: ignore[no-untyped-def]
    clock = Clock()
    store = SqliteStore(tmp_path / "db.sqlite", clock=clock)
    await store.open()
    provider = ScriptedProvider()
    core = ImageCore(
        catalog=load_catalog(),
        store=store,
        providers={"local": provider},
        images=ImageStore(tmp_path / "images", b"secret", 3600, clock=clock),
        default_model="local",
        upstream_timeout_s=0.5,
        reservation_ttl_s=900,
        clock=clock,
    )
    await store.create_account("a", 100_000)
    key = keys.new_key()
    await store.create_key("a", keys.hash_key(key), "p", "", None)
    caller = await core.authenticate(f"Bearer {key}")
    yield core, store, provider, caller, clock
    await store.close()


CTX = RequestContext("req-1", "http://127.0.0.1:8080")


async def as_is(gen: Generation) -> Generation:
    """The render step of a transport that sends the Generation itself."""
    return gen


async def _balance(store: SqliteStore) -> int:
    account = await store.get_account("a")
    assert account
    assert await store.ledger_sum(account.id) == account.balance_micros
    return account.balance_micros


async def test_settles_only_images_returned(parts) -> None:  # type: ignore[no-untyped-def]
    core, store, provider, caller, _ = parts
    provider.images_returned = 2
    gen = await core.generate(caller, GenerationParams(prompt="p", n=4, size="256x256"), CTX, as_is)
    assert len(gen.images) == 2 and gen.cost_micros == 2000
    assert await _balance(store) == 100_000 - 2000


async def test_extra_upstream_images_are_neither_returned_nor_charged(parts) -> None:  # type: ignore[no-untyped-def]
    core, store, provider, caller, _ = parts
    provider.images_returned = 5
    gen = await core.generate(caller, GenerationParams(prompt="p", n=2, size="256x256"), CTX, as_is)
    assert len(gen.images) == 2
    assert await _balance(store) == 100_000 - 2000


@pytest.mark.parametrize(
    "error", [UpstreamError("boom"), ContentPolicy("refused"), RuntimeError("adapter bug")]
)
async def test_failure_releases_everything(parts, error: Exception) -> None:  # type: ignore[no-untyped-def]
    core, store, provider, caller, _ = parts
    provider.error = error
    with pytest.raises(type(error)):
        await core.generate(caller, GenerationParams(prompt="p", n=3), CTX, as_is)
    assert await _balance(store) == 100_000
    assert [u.status for u in await store.usage("a")] == ["released"]


async def test_zero_images_is_an_upstream_error_and_free(parts) -> None:  # type: ignore[no-untyped-def]
    core, store, provider, caller, _ = parts
    provider.images_returned = 0
    with pytest.raises(UpstreamError):
        await core.generate(caller, GenerationParams(prompt="p"), CTX, as_is)
    assert await _balance(store) == 100_000


async def test_timeout_is_upstream_error_and_free(parts) -> None:  # type: ignore[no-untyped-def]
    core, store, provider, caller, _ = parts
    provider.delay_s = 5
    with pytest.raises(UpstreamError, match="did not answer"):
        await core.generate(caller, GenerationParams(prompt="p"), CTX, as_is)
    assert await _balance(store) == 100_000


async def test_cancelled_request_is_free(parts) -> None:  # type: ignore[no-untyped-def]
    core, store, provider, caller, _ = parts
    provider.delay_s = 0.3
    task = asyncio.create_task(core.generate(caller, GenerationParams(prompt="p"), CTX, as_is))
    await asyncio.sleep(0.05)
    assert await _balance(store) == 100_000 - 1000  # held while in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert await _balance(store) == 100_000


async def test_cancelled_at_any_moment_holds_nothing_after(parts) -> None:  # type: ignore[no-untyped-def]
    """Cancelled after 0..11 loop turns or a few ms: in the reserve hop, the dispatch,
    the image writes, the settle. Checked right after each task has ended."""
    core, store, _, caller, _ = parts
    rng = random.Random(6)
    for i in range(80):
        task = asyncio.create_task(
            core.generate(caller, GenerationParams(prompt="p", size="256x256"), CTX, as_is)
        )
        if i % 2:
            for _ in range(rng.randrange(12)):
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(rng.uniform(0, 0.004))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        usage = await store.usage("a", limit=1000)
        assert [u.request_id for u in usage if u.status == "held"] == []
        delivered = sum(u.cost_micros for u in usage if u.status == "settled")
        assert await _balance(store) == 100_000 - delivered


async def test_cancelled_again_while_releasing_still_releases(parts) -> None:  # type: ignore[no-untyped-def]
    core, store, provider, caller, _ = parts
    provider.delay_s = 0.3
    task = asyncio.create_task(core.generate(caller, GenerationParams(prompt="p"), CTX, as_is))
    await asyncio.sleep(0.05)
    for _ in range(5):  # a transport may cancel more than once
        task.cancel()
        await asyncio.sleep(0)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert [u.status for u in await store.usage("a")] == ["released"]
    assert await _balance(store) == 100_000


async def test_reservation_left_by_a_crash_is_released_once(parts) -> None:  # type: ignore[no-untyped-def]
    core, store, _, caller, clock = parts
    charge = Charge("r", caller.key_id, "local", 1, "256x256", "standard")
    reservation = await store.reserve(caller.account_id, 5000, charge, clock.now + 900)
    await core.sweep()
    assert await _balance(store) == 95_000  # not expired yet
    clock.now += 901
    await core.sweep()
    assert await _balance(store) == 100_000
    await store.settle(reservation, 5000)  # a late settle after release changes nothing
    await store.release(reservation)
    assert await _balance(store) == 100_000


async def test_reserve_refuses_more_than_balance(parts) -> None:  # type: ignore[no-untyped-def]
    _, store, _, caller, clock = parts
    charge = Charge("r", caller.key_id, "local", 1, "256x256", "standard")
    with pytest.raises(InsufficientBalance):
        await store.reserve(caller.account_id, 100_001, charge, clock.now + 1)
    await store.reserve(caller.account_id, 100_000, charge, clock.now + 1)
    assert await _balance(store) == 0


async def test_image_links_expire(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    core, _, _, caller, clock = parts
    gen = await core.generate(caller, GenerationParams(prompt="p", size="256x256"), CTX, as_is)
    url = gen.images[0].url
    assert url
    path, _, query = url.removeprefix(CTX.base_url).partition("?")
    args = dict(part.split("=") for part in query.split("&"))
    image_id = path.rsplit("/", 1)[1]
    assert await core.get_image(image_id, args["expires"], args["signature"]) == (PNG, "image/png")
    clock.now += 3601
    with pytest.raises(Exception, match="expired"):
        await core.get_image(image_id, args["expires"], args["signature"])
