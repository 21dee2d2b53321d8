"""Domain errors -> gRPC status with google.rpc.ErrorInfo: the service's one error table."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import errors

DOMAIN = "imagegate"

CODES: dict[type[errors.ImagegateError], grpc.StatusCode] = {
    errors.InvalidParameter: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidBody: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UploadTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotSupported: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ContentPolicy: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidApiKey: grpc.StatusCode.UNAUTHENTICATED,
    errors.ModelNotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    errors.InsufficientBalance: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IdempotencyConflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.IdempotencyInFlight: grpc.StatusCode.ABORTED,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UpstreamError: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ImageNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.AdminRequired: grpc.StatusCode.PERMISSION_DENIED,
    errors.AccountNotFound: grpc.StatusCode.NOT_FOUND,
    errors.AccountTaken: grpc.StatusCode.ALREADY_EXISTS,
    errors.KeyNotFound: grpc.StatusCode.NOT_FOUND,
}
# DEADLINE_EXCEEDED also comes from grpc itself, without a reason, when the deadline
# passes before the dispatcher's own end (set to the same instant) does.


def status_code(err: errors.ImagegateError) -> grpc.StatusCode:
    """The code of the nearest class in the table: a subclass maps like its base."""
    for cls in type(err).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(err: errors.ImagegateError) -> grpc.Status:
    """The rich status, plus the ErrorInfo facts as plain trailing metadata.

    The metadata copy (imagegate-reason/-param/-code, retry-after) is for fronts
    that cannot decode protobuf details, namely Envoy's Lua filter.
    """
    status = status_message(err)
    trailers = [("imagegate-reason", err.reason)]
    trailers.extend((f"imagegate-{k}", v) for k, v in _metadata(err).items())
    if isinstance(err, errors.RateLimited):
        trailers.append(("retry-after", str(err.retry_after_s)))
    rich = rpc_status.to_status(status)
    return _Status(rich.code, rich.details, (*rich.trailing_metadata, *trailers))


def status_message(err: errors.ImagegateError) -> status_pb2.Status:
    """The google.rpc.Status of an error, ErrorInfo in its details (also sent in-band,
    as a streamed RPC's error event)."""
    # ASCII only (others as \xe9-style escapes): a message may echo caller input,
    # and Envoy's Lua front then needs no UTF-8 decoder to write it as JSON.
    message = err.message.encode("ascii", "backslashreplace").decode()
    status = status_pb2.Status(code=status_code(err).value[0], message=message)
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=_metadata(err))
    detail = any_pb2.Any()
    detail.Pack(info)
    status.details.append(detail)
    return status


def _metadata(err: errors.ImagegateError) -> dict[str, str]:
    metadata = {}
    if err.param:
        metadata["param"] = err.param
    if isinstance(err, errors.InvalidParameter):
        metadata["code"] = "missing_required_parameter" if err.missing else "invalid_value"
    if isinstance(err, errors.InvalidBody):
        metadata["code"] = err.code
    return metadata


INTERNAL_MESSAGE = "internal error"


def internal_status_message() -> status_pb2.Status:
    return status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message=INTERNAL_MESSAGE)


def internal_status() -> grpc.Status:
    """For bugs: no detail of what went wrong leaves the process."""
    return _Status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, ())


async def abort(context: grpc.aio.ServicerContext, status: grpc.Status) -> NoReturn:
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")


class _Status(grpc.Status):
    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, str], ...]
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
