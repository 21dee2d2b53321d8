"""The aiohttp front: OpenAI-shaped REST in, ImageService gRPC out, by transcoding alone."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from aiohttp import web
from google.api import httpbody_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_status import rpc_status
from imagegate.v1 import images_pb2, images_pb2_grpc

from gateway import errors, health, json_text, sse, telemetry, uploads
from gateway.config import GatewayConfig
from gateway.request_json import InvalidJson, parse_request

log = logging.getLogger("imagegate.gateway")

STUB: web.AppKey[images_pb2_grpc.ImageServiceStub] = web.AppKey("stub")
UPLOADS: web.AppKey[uploads.UploadCalls] = web.AppKey("uploads")
CONFIG: web.AppKey[GatewayConfig] = web.AppKey("config")
REQUEST_ID = "x-request-id"
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("request_id")
# Request headers passed to the service as gRPC metadata, as Envoy does.
FORWARDED = ("authorization", "idempotency-key")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(config: GatewayConfig) -> web.Application:
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[telemetry.middleware, request_id_and_errors],
    )
    app[CONFIG] = config
    app[telemetry.LIFECYCLE] = telemetry.Lifecycle()
    app.cleanup_ctx.append(_channel)
    health.add_routes(app)
    app.router.add_post("/v1/images/generations", generate_images)
    app.router.add_post("/v1/images/edits", edit_images)
    app.router.add_post("/v1/images/variations", create_image_variation)
    app.router.add_get("/v1/models", list_models, allow_head=False)
    app.router.add_get("/v1/models/{model}", get_model, allow_head=False)
    app.router.add_get("/v1/images/files/{image_id}", get_image, allow_head=False)
    app.router.add_get("/v1/balance", get_balance, allow_head=False)
    app.router.add_get("/v1/usage", list_usage, allow_head=False)
    return app


async def _channel(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    size = config.max_message_bytes
    channel = grpc.aio.insecure_channel(
        config.grpc_target,
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
    )
    app[STUB] = images_pb2_grpc.ImageServiceStub(channel)
    app[health.STUB] = health_pb2_grpc.HealthStub(channel)
    app[UPLOADS] = uploads.UploadCalls(channel)
    yield
    await channel.close()


async def generate_images(request: web.Request) -> web.StreamResponse:
    try:
        message = parse_request(await request.read(), images_pb2.GenerateImagesRequest())
    except InvalidJson:
        raise _Failure(errors.INVALID_JSON) from None
    if message.stream:
        # Same path, as OpenAI serves it; Envoy's Lua filter routes it the same way.
        call = request.app[STUB].StreamImages(message, **_call_options(request))
        return await sse.relay(request, call, {REQUEST_ID: request[REQUEST_ID_KEY]})
    reply = await request.app[STUB].GenerateImages(message, **_call_options(request))
    return _json(reply)


async def edit_images(request: web.Request) -> web.StreamResponse:
    message, stream = await _upload(request, "EditImages", streamable=True)
    if stream:
        # As a streamed generation: its own RPC, written as server-sent events.
        call = request.app[UPLOADS].stream_edit(message, **_call_options(request))
        return await sse.relay(request, call, {REQUEST_ID: request[REQUEST_ID_KEY]})
    reply = await request.app[UPLOADS].call("EditImages", message, **_call_options(request))
    return _json(reply)


async def create_image_variation(request: web.Request) -> web.Response:
    message, _ = await _upload(request, "CreateImageVariation")
    reply = await request.app[UPLOADS].call(
        "CreateImageVariation", message, **_call_options(request)
    )
    return _json(reply)


async def _upload(
    request: web.Request, method: str, *, streamable: bool = False
) -> tuple[bytes, bool]:
    """The raw body under the upload limit (gateway/uploads.py); the service parses it."""
    try:
        return await uploads.read_upload(
            request, request.app[CONFIG].max_upload_bytes, method, streamable=streamable
        )
    except uploads.TooLarge:
        raise _Failure(errors.TOO_LARGE) from None
    except uploads.Encoded:
        raise _Failure(errors.ENCODED_UPLOAD) from None


async def list_models(request: web.Request) -> web.Response:
    reply = await request.app[STUB].ListModels(
        images_pb2.ListModelsRequest(), **_call_options(request)
    )
    return _json(reply)


async def get_model(request: web.Request) -> web.Response:
    message = images_pb2.GetModelRequest(model=request.match_info["model"])
    reply = await request.app[STUB].GetModel(message, **_call_options(request))
    return _json(reply)


async def get_image(request: web.Request) -> web.Response:
    message = images_pb2.GetImageRequest(
        image_id=request.match_info["image_id"],
        # The last of repeated parameters, as Envoy's transcoder binds them.
        expires=request.query.getall("expires", [""])[-1],
        signature=request.query.getall("signature", [""])[-1],
    )
    body: httpbody_pb2.HttpBody = await request.app[STUB].GetImage(
        message, **_call_options(request)
    )
    return web.Response(body=body.data, headers={"Content-Type": body.content_type})


async def get_balance(request: web.Request) -> web.Response:
    reply = await request.app[STUB].GetBalance(
        images_pb2.GetBalanceRequest(), **_call_options(request)
    )
    return _json(reply)


async def list_usage(request: web.Request) -> web.Response:
    message = images_pb2.ListUsageRequest(
        limit=_query(request, "limit"), after=_query(request, "after")
    )
    reply = await request.app[STUB].ListUsage(message, **_call_options(request))
    return _json(reply)


def _query(request: web.Request, name: str) -> str:
    """The last of repeated parameters, as Envoy's transcoder binds them."""
    return request.query.getall(name, [""])[-1]


def _call_options(request: web.Request) -> dict[str, object]:
    metadata = [(name, request.headers[name]) for name in FORWARDED if name in request.headers]
    metadata += [
        (REQUEST_ID, request[REQUEST_ID_KEY]),
        # Where the client reached us, so image URLs point back here.
        ("x-forwarded-host", request.host),
        ("x-forwarded-proto", request.scheme),
    ]
    if telemetry.tracing_active():
        metadata += telemetry.trace_metadata()
    else:
        metadata += telemetry.passed_through(request)
    return {"metadata": metadata, "timeout": request.app[CONFIG].timeout_s}


def _json(message: Message) -> web.Response:
    return _json_bytes(200, json_text.message_json(message))


def _json_bytes(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=body, headers={"Content-Type": "application/json", **(headers or {})}
    )


class _Failure(Exception):
    """A front-detected error row, raised from a handler."""

    def __init__(self, row: errors.Row) -> None:
        self.row = row


@web.middleware
async def request_id_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[REQUEST_ID_KEY] = request.headers.get(REQUEST_ID) or str(uuid.uuid4())
    try:
        response = await handler(request)
    except _Failure as failure:
        response = _json_bytes(failure.row.status, errors.error_body(failure.row))
    except grpc.aio.AioRpcError as err:
        response = _from_grpc(err)
    except web.HTTPException as exc:
        response = _from_http(request, exc)
    except Exception:
        log.exception("request %s failed in the front", request[REQUEST_ID_KEY])
        response = _json_bytes(errors.INTERNAL.status, errors.error_body(errors.INTERNAL))
    if not response.prepared:  # a stream has sent its headers (x-request-id among them)
        response.headers[REQUEST_ID] = request[REQUEST_ID_KEY]
    return response


def _from_grpc(err: grpc.aio.AioRpcError) -> web.Response:
    info = _error_info(err)
    if info is None:
        row = errors.BY_CODE.get(err.code(), errors.INTERNAL)
        if row is errors.INTERNAL:
            log.error("service answered %s without an imagegate reason", err.code().name)
        return _json_bytes(row.status, errors.error_body(row))
    row = errors.BY_REASON.get(info.reason, errors.INTERNAL)
    headers = {}
    retry_after = dict(err.trailing_metadata() or ()).get("retry-after")
    if isinstance(retry_after, str):
        headers["Retry-After"] = retry_after
    body = errors.error_body(
        row,
        message=err.details() if row is not errors.INTERNAL else None,
        param=info.metadata.get("param"),
        code=info.metadata.get("code"),
    )
    return _json_bytes(row.status, body, headers)


def _error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        return None
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == "imagegate":
            return info
    return None


def _from_http(request: web.Request, exc: web.HTTPException) -> web.Response:
    headers = {}
    path = request.rel_url.raw_path
    if exc.status == 405:
        row, message = errors.WRONG_METHOD, errors.wrong_method_message(request.method, path)
        headers["Allow"] = exc.headers.get("Allow", "")
    elif exc.status == 413:
        row, message = errors.TOO_LARGE, None
    elif exc.status == 404:
        row, message = errors.UNKNOWN_URL, errors.unknown_url_message(request.method, path)
    else:
        raise exc
    return _json_bytes(row.status, errors.error_body(row, message), headers)
