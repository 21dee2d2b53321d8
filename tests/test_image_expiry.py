"""Signed image URLs stop working when they expire, through both fronts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.conftest import FRONTS, Stack, make_tenant, sdk, start_stack
from tests.rest import assert_error, call


@pytest.fixture(scope="module")
async def short_lived(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    stack, closers = await start_stack(
        tmp_path_factory.mktemp("expiry"), envoy="envoy" in FRONTS, image_ttl_s=2
    )
    yield stack
    for close in closers:
        await close()


@pytest.mark.parametrize("front", FRONTS)
async def test_expired_url_is_404(short_lived: Stack, front: str) -> None:
    tenant = await make_tenant(short_lived.service)
    result = await sdk(short_lived.fronts[front], tenant.key).images.generate(
        model="local", prompt="a melting clock", size="256x256"
    )
    url = result.data[0].url
    assert url is not None
    assert (await call("GET", url)).status == 200
    expires = int(url.split("expires=")[1].split("&")[0])
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.2)
    assert_error(await call("GET", url), 404, "invalid_request_error", "image_not_found")
