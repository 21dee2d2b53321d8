"""ImageService over gRPC with odd input: bytes that do not decode, odd link values, request ids."""

from __future__ import annotations

import re

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from imagegate.v1 import images_pb2, images_pb2_grpc

from service.images import NOT_FOUND
from tests.conftest import Stack, make_tenant

SERVICE = "/imagegate.v1.ImageService/"


def _reason(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, (err.code(), err.details())
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and info.domain == "imagegate"
    return err.code(), info.reason, dict(info.metadata)


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("GenerateImages", b"\xff\xff\xff"),  # wire format corrupt
        ("GenerateImages", b"\x0a\x02\xc3\x28"),  # prompt: invalid UTF-8
        ("ListModels", b"\x0a\x05hello\xff"),
        ("GetImage", b"\x12\x01\xff"),  # expires: invalid UTF-8 (Envoy passes %FF on as it is)
    ],
)
async def test_undecodable_requests_are_invalid_argument(
    stack: Stack, method: str, raw: bytes
) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        call = channel.unary_unary(SERVICE + method)  # bytes in, bytes out
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(raw)
    code, reason, metadata = _reason(raised.value)
    assert (code, reason, metadata) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PARAMETER",
        {"code": "invalid_value"},
    )
    details = raised.value.details() or ""
    assert "class" not in details and "Error" not in details
    assert details == f"The request is not a valid protobuf message for {SERVICE}{method}."


async def test_every_service_decodes_through_the_guard(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await check(b"\xff")
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Streaming handlers still work through it.
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="imagegate.v1.ImageService"))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


@pytest.mark.parametrize(
    ("expires", "signature"),
    [
        ("²", "0" * 64),
        ("\uff11\uff12", "0" * 64),  # fullwidth digits
        ("9" * 5000, "0" * 64),
        ("9999999999", "é" * 64),
        ("9999999999", "Z" * 64),
        ("9999999999", "0" * 65),
        ("-1", "0" * 64),
    ],
    ids=["superscript", "fullwidth", "5000-digits", "non-ascii-sig", "non-hex", "long-sig", "neg"],
)
async def test_odd_link_values_over_grpc(
    grpc_stub: images_pb2_grpc.ImageServiceStub, expires: str, signature: str
) -> None:
    for image_id in ("abc.png", "a\x00b.png", "../x.png", "é.png"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await grpc_stub.GetImage(
                images_pb2.GetImageRequest(image_id=image_id, expires=expires, signature=signature)
            )
        assert _reason(raised.value)[:2] == (grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND")
        assert raised.value.details() == NOT_FOUND


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("trace-1.2:3_X", True), ("a" * 128, True), ("a" * 129, False), ("a b", False), ("", False)],
)
async def test_service_request_ids(
    stack: Stack, grpc_stub: images_pb2_grpc.ImageServiceStub, sent: str, kept: bool
) -> None:
    tenant = await make_tenant(stack.service)
    await grpc_stub.GenerateImages(
        images_pb2.GenerateImagesRequest(model="local", prompt="a kite", size="256x256"),
        metadata=[("authorization", f"Bearer {tenant.key}"), ("x-request-id", sent)],
    )
    [usage] = await stack.service.store.usage(tenant.account)
    if kept:
        assert usage.request_id == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", usage.request_id), usage.request_id
