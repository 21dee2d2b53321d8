"""A domain error's subclass answers exactly as its base class does, over gRPC and REST."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc

from service import errors
from service.providers.base import ProviderResult, UpstreamCall
from tests.conftest import FRONTS, Stack, balance, make_tenant, start_stack
from tests.rest import assert_error, call
from tests.test_grpc import _reason


class QuotaExhausted(errors.UpstreamError):
    """As an adapter might add: the upstream account ran out of quota."""


class Nsfw(errors.ContentPolicy):
    pass


class Failing:
    """Stands in for the provider: every call raises the error given."""

    id = "local"
    kind = "local"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def max_n(self, upstream_model: str) -> int:
        return 10

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        raise self.error

    async def aclose(self) -> None:
        pass


# (error, gRPC code, ErrorInfo reason + metadata, HTTP status, type, code, param)
CASES = [
    (
        errors.UpstreamRejected("Bad size for this upstream.", param="size"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("INVALID_PARAMETER", {"param": "size", "code": "invalid_value"}),
        (400, "invalid_request_error", "invalid_value", "size"),
    ),
    (
        QuotaExhausted("The upstream provider 'local' is out of quota."),
        grpc.StatusCode.UNAVAILABLE,
        ("UPSTREAM_ERROR", {}),
        (502, "upstream_error", "upstream_error", None),
    ),
    (
        Nsfw("Refused by the upstream's safety system."),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("CONTENT_POLICY", {}),
        (400, "invalid_request_error", "content_policy_violation", None),
    ),
    (
        # Its own gRPC code (the duplicate is still running), the base's reason and row.
        errors.IdempotencyInFlight("A request with this Idempotency-Key is still in progress."),
        grpc.StatusCode.ABORTED,
        ("IDEMPOTENCY_CONFLICT", {}),
        (409, "invalid_request_error", "idempotency_key_conflict", None),
    ),
]
IDS = ["UpstreamRejected", "UpstreamError-subclass", "ContentPolicy-subclass", "InFlight"]


@pytest.fixture(scope="module")
async def failing(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    stack, closers = await start_stack(tmp_path_factory.mktemp("failing"), envoy="envoy" in FRONTS)
    yield stack
    for close in closers:
        await close()


@pytest.fixture
def raising(failing: Stack) -> Iterator[Failing]:
    providers = failing.service.registry.providers  # the dispatcher's own mapping
    original = providers["local"]
    providers["local"] = fake = Failing(RuntimeError("set by the test"))
    yield fake
    providers["local"] = original


@pytest.mark.parametrize(("error", "code", "info", "rest"), CASES, ids=IDS)
async def test_grpc(
    failing: Stack,
    raising: Failing,
    error: Exception,
    code: grpc.StatusCode,
    info,
    rest,  # type: ignore[no-untyped-def]
) -> None:
    raising.error = error
    tenant = await make_tenant(failing.service)
    async with grpc.aio.insecure_channel(failing.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await images_pb2_grpc.ImageServiceStub(channel).GenerateImages(
                images_pb2.GenerateImagesRequest(model="local", prompt="p"),
                metadata=[("authorization", f"Bearer {tenant.key}")],
            )
    assert _reason(raised.value) == (code, *info)
    assert raised.value.details() == str(error)
    assert await balance(failing.service, tenant.account) == 1_000_000


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize(("error", "code", "info", "rest"), CASES, ids=IDS)
async def test_rest(
    failing: Stack,
    raising: Failing,
    front: str,
    error: Exception,
    code,
    info,
    rest,  # type: ignore[no-untyped-def]
) -> None:
    raising.error = error
    tenant = await make_tenant(failing.service)
    reply = await call(
        "POST",
        f"{failing.fronts[front]}/v1/images/generations",
        key=tenant.key,
        json_body={"model": "local", "prompt": "p"},
    )
    status, type_, error_code, param = rest
    body = assert_error(reply, status, type_, error_code, param)
    assert body["message"] == str(error)
    assert await balance(failing.service, tenant.account) == 1_000_000
