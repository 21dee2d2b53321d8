"""A response too large for the transport is refused before any charge, on every surface."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc

from service.server import message_size_options
from tests.conftest import FRONTS, Stack, balance, make_tenant, start_stack
from tests.rest import assert_error, call
from tests.test_grpc import _reason

MiB = 1024 * 1024
# One hd 1792x1024 PNG is about 3 MiB: one fits in 4 MiB, two do not.
LIMIT = 4 * MiB
BODY = {
    "model": "local",
    "prompt": "a crowded harbour",
    "size": "1792x1024",
    "quality": "hd",
    "response_format": "b64_json",
}


@pytest.fixture(scope="module")
async def small(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A service whose gRPC messages may not exceed LIMIT (its fronts keep 64 MiB)."""
    stack, closers = await start_stack(
        tmp_path_factory.mktemp("small"), envoy="envoy" in FRONTS, max_message_bytes=LIMIT
    )
    yield stack
    for close in closers:
        await close()


async def _untouched(stack: Stack, account: str) -> None:
    assert await balance(stack.service, account) == 1_000_000
    assert [u.status for u in await stack.service.store.usage(account)] == ["released"]


@pytest.mark.parametrize("front", FRONTS)
async def test_rest(small: Stack, front: str) -> None:
    tenant = await make_tenant(small.service)
    url = f"{small.fronts[front]}/v1/images/generations"
    reply = await call("POST", url, key=tenant.key, json_body={**BODY, "n": 2})
    error = assert_error(reply, 400, "invalid_request_error", "invalid_value", "n")
    assert "fewer images" in error["message"] and "'url'" in error["message"]
    await _untouched(small, tenant.account)


async def test_grpc(small: Stack) -> None:
    tenant = await make_tenant(small.service)
    metadata = [("authorization", f"Bearer {tenant.key}")]
    async with grpc.aio.insecure_channel(
        small.grpc_target, options=message_size_options(64 * MiB)
    ) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GenerateImages(
                images_pb2.GenerateImagesRequest(**BODY, n=2), metadata=metadata
            )
        assert _reason(raised.value) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PARAMETER",
            {"param": "n", "code": "invalid_value"},
        )
        await _untouched(small, tenant.account)
        # One image fits: delivered and charged as usual.
        reply = await stub.GenerateImages(
            images_pb2.GenerateImagesRequest(**BODY, n=1), metadata=metadata
        )
    assert len(reply.data) == 1 and reply.ByteSize() <= LIMIT
    assert await balance(small.service, tenant.account) == 1_000_000 - 3000
