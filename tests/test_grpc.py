"""ImageService called directly over gRPC: codes and ErrorInfo reasons of the error table."""

from __future__ import annotations

import io

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from imagegate.v1 import images_pb2, images_pb2_grpc
from PIL import Image

from tests.conftest import Stack, Tenant, balance, make_tenant

PROMPT = "a red fox in snow"


def _auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _reason(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details"
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert info.domain == "imagegate"
    return err.code(), info.reason, dict(info.metadata)


async def test_generate_returns_raw_image_bytes(
    grpc_stub: images_pb2_grpc.ImageServiceStub, tenant: Tenant
) -> None:
    reply = await grpc_stub.GenerateImages(
        images_pb2.GenerateImagesRequest(
            model="local", prompt=PROMPT, n=2, size="512x512", response_format="b64_json"
        ),
        metadata=_auth(tenant.key),
    )
    assert len(reply.data) == 2
    for item in reply.data:
        assert not item.HasField("url")
        image = Image.open(io.BytesIO(item.b64_json))  # bytes, not base64, over gRPC
        assert image.size == (512, 512)


@pytest.mark.parametrize(
    ("request_", "code", "reason", "meta"),
    [
        (
            images_pb2.GenerateImagesRequest(model="local"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PARAMETER",
            {"param": "prompt", "code": "missing_required_parameter"},
        ),
        (
            images_pb2.GenerateImagesRequest(model="local", prompt=PROMPT, size="1x1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PARAMETER",
            {"param": "size", "code": "invalid_value"},
        ),
        (
            images_pb2.GenerateImagesRequest(model="nope", prompt=PROMPT),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MODEL_NOT_SUPPORTED",
            {"param": "model"},
        ),
        (
            images_pb2.GenerateImagesRequest(model="local", prompt=PROMPT, n=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PARAMETER",
            {"param": "n", "code": "invalid_value"},
        ),
    ],
)
async def test_parameter_errors(
    grpc_stub: images_pb2_grpc.ImageServiceStub,
    stack: Stack,
    tenant: Tenant,
    request_: images_pb2.GenerateImagesRequest,
    code: grpc.StatusCode,
    reason: str,
    meta: dict[str, str],
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await grpc_stub.GenerateImages(request_, metadata=_auth(tenant.key))
    assert _reason(raised.value) == (code, reason, meta)
    assert await balance(stack.service, tenant.account) == 1_000_000


async def test_auth_errors(grpc_stub: images_pb2_grpc.ImageServiceStub, stack: Stack) -> None:
    request = images_pb2.GenerateImagesRequest(model="local", prompt=PROMPT)
    for metadata in ([], _auth("sk-nope"), _auth("sk-" + "C" * 43)):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await grpc_stub.GenerateImages(request, metadata=metadata)
        assert _reason(raised.value)[:2] == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")

    limited = await make_tenant(stack.service, models=("other",))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await grpc_stub.GenerateImages(request, metadata=_auth(limited.key))
    assert _reason(raised.value) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "MODEL_NOT_ALLOWED",
        {"param": "model"},
    )

    poor = await make_tenant(stack.service, credit_usd="0.0005")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await grpc_stub.GenerateImages(request, metadata=_auth(poor.key))
    assert _reason(raised.value)[:2] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_BALANCE",
    )
    assert await balance(stack.service, poor.account) == 500


async def test_image_not_found(grpc_stub: images_pb2_grpc.ImageServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await grpc_stub.GetImage(
            images_pb2.GetImageRequest(image_id="abc.png", expires="99999999999", signature="00")
        )
    assert _reason(raised.value)[:2] == (grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND")


async def test_get_model(grpc_stub: images_pb2_grpc.ImageServiceStub, tenant: Tenant) -> None:
    reply = await grpc_stub.GetModel(
        images_pb2.GetModelRequest(model="local"), metadata=_auth(tenant.key)
    )
    assert (reply.id, reply.object, reply.owned_by) == ("local", "model", "imagegate")
    assert reply.created > 0


async def test_get_model_unknown_or_hidden_is_not_found(
    grpc_stub: images_pb2_grpc.ImageServiceStub, stack: Stack, tenant: Tenant
) -> None:
    limited = await make_tenant(stack.service, models=("other",))
    answers = []
    # Unknown, and known but not this key's: the same answer, so the key learns nothing.
    for key, model in ((tenant.key, "dall-e-9"), (limited.key, "local")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await grpc_stub.GetModel(images_pb2.GetModelRequest(model=model), metadata=_auth(key))
        assert _reason(raised.value) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", {})
        answers.append(raised.value.details().replace(model, "MODEL"))
    assert answers[0] == answers[1]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await grpc_stub.GetModel(images_pb2.GetModelRequest(model="local"))
    assert _reason(raised.value)[:2] == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")


async def test_usage_carries_both_vocabularies(
    grpc_stub: images_pb2_grpc.ImageServiceStub, tenant: Tenant
) -> None:
    reply = await grpc_stub.GenerateImages(
        images_pb2.GenerateImagesRequest(model="local", prompt=PROMPT, size="256x256"),
        metadata=_auth(tenant.key),
    )
    # The local renderer counts no tokens; the details are there all the same.
    assert reply.usage.HasField("input_tokens_details")
    assert reply.usage == images_pb2.Usage(input_tokens_details=images_pb2.InputTokensDetails())


async def test_health_and_reflection(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="imagegate.v1.ImageService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        admin = await health.Check(
            health_pb2.HealthCheckRequest(service="imagegate.v1.AdminService")
        )
        assert admin.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        names: list[str] = []
        async for answer in reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names += [s.name for s in answer.list_services_response.service]
        assert "imagegate.v1.ImageService" in names
        assert "imagegate.v1.AdminService" in names
        assert "grpc.health.v1.Health" in names
