"""The aiohttp front: OpenAI-shaped REST in, ImageService gRPC out, by transcoding alone."""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from aiohttp import HttpVersion11, web
from google.api import httpbody_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_status import rpc_status
from imagegate.v1 import admin_pb2, admin_pb2_grpc, images_pb2, images_pb2_grpc

from gateway import (
    console,
    errors,
    health,
    http_input,
    json_text,
    response_json,
    sse,
    telemetry,
    uploads,
)
from gateway.channels import Channels, Unary
from gateway.config import GatewayConfig
from gateway.request_json import InvalidJson, parse_request

log = logging.getLogger("imagegate.gateway")

STUB: web.AppKey[images_pb2_grpc.ImageServiceStub] = web.AppKey("stub")
ADMIN_STUB: web.AppKey[admin_pb2_grpc.AdminServiceStub] = web.AppKey("admin_stub")
UPLOADS: web.AppKey[uploads.UploadCalls] = web.AppKey("uploads")
# GenerateImages returning the raw reply, which response_json prints without parsing its images.
GENERATE: web.AppKey[Unary] = web.AppKey("generate")
# ListModels returning the raw reply, whose JSON is remembered (_models_json).
LIST_MODELS: web.AppKey[Unary] = web.AppKey("list_models")
CONFIG: web.AppKey[GatewayConfig] = web.AppKey("config")
REQUEST_ID = "x-request-id"
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("request_id")
# Request headers passed to the service as gRPC metadata, as Envoy does.
FORWARDED = (b"authorization", b"idempotency-key")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=Message)
# The REST surface, matched on the raw path exactly as Envoy's Lua filter
# matches it (its ROUTES table; tests/test_envoy_config.py keeps the two equal).
# A path served with several methods has one row per method.
ROUTES: tuple[tuple[str, str], ...] = (
    (r"^/v1/images/generations$", "POST"),
    (r"^/v1/images/edits$", "POST"),
    (r"^/v1/images/variations$", "POST"),
    (r"^/v1/models$", "GET"),
    (r"^/v1/models/[^/]+$", "GET"),
    (r"^/v1/images/files/[^/]+$", "GET"),
    (r"^/v1/balance$", "GET"),
    (r"^/v1/usage$", "GET"),
    (r"^/v1/usage/daily$", "GET"),
    (r"^/v1/keys$", "GET"),
    (r"^/v1/keys$", "POST"),
    (r"^/v1/keys/[^/]+$", "DELETE"),
    (r"^/admin/v1/accounts$", "GET"),
    (r"^/admin/v1/accounts$", "POST"),
    (r"^/admin/v1/accounts/[^/]+$", "GET"),
    (r"^/admin/v1/accounts/[^/]+/credit$", "POST"),
    (r"^/admin/v1/keys$", "GET"),
    (r"^/admin/v1/keys$", "POST"),
    (r"^/admin/v1/keys/[^/]+$", "PATCH"),
    (r"^/admin/v1/keys/[^/]+$", "DELETE"),
    (r"^/admin/v1/usage$", "GET"),
    (r"^/admin/v1/requests$", "GET"),
    (r"^/admin/v1/models$", "GET"),
    (r"^/healthz$", "GET"),
    (r"^/readyz$", "GET"),
    (r"^/openapi\.json$", "GET"),
)
_ROUTES = [(re.compile(pattern), method) for pattern, method in ROUTES]
# The OpenAPI document of the surface; Envoy serves the same file.
OPENAPI = importlib.resources.files("gateway").joinpath("openapi.json").read_bytes()


def create_app(config: GatewayConfig) -> web.Application:
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[telemetry.middleware, request_id_and_errors],
    )
    app[CONFIG] = config
    app[telemetry.LIFECYCLE] = telemetry.Lifecycle()
    app.cleanup_ctx.append(_channel)
    route = app.router.add_route
    route("GET", "/healthz", health.healthz, expect_handler=_expect)
    route("GET", "/readyz", health.readyz, expect_handler=_expect)
    route("POST", "/v1/images/generations", generate_images, expect_handler=_expect)
    route("POST", "/v1/images/edits", edit_images, expect_handler=_expect)
    route("POST", "/v1/images/variations", create_image_variation, expect_handler=_expect)
    route("GET", "/v1/models", list_models, expect_handler=_expect)
    route("GET", "/v1/models/{model}", get_model, expect_handler=_expect)
    route("GET", "/v1/images/files/{image_id}", get_image, expect_handler=_expect)
    route("GET", "/v1/balance", get_balance, expect_handler=_expect)
    route("GET", "/v1/usage", list_usage, expect_handler=_expect)
    for method, path, handler in ACCOUNT_ROUTES:
        route(method, path, handler, expect_handler=_expect)
    route("GET", "/openapi.json", openapi, expect_handler=_expect)
    # The web console (aiohttp front only; Envoy routes /console to this front).
    console.add_routes(app, front_call, config.trusted_proxies)
    # Every other method and path: the middleware answers 404/405 from ROUTES,
    # and aiohttp's own fallback (which answers 417 to an unknown Expect) never runs.
    route("*", "/{path:.*}", _unrouted, expect_handler=_expect)
    return app


async def _channel(app: web.Application) -> AsyncIterator[None]:
    channels = Channels(app[CONFIG])
    channel = channels.spread
    app[STUB] = images_pb2_grpc.ImageServiceStub(channel)
    app[ADMIN_STUB] = admin_pb2_grpc.AdminServiceStub(channel)
    app[health.STUB] = health_pb2_grpc.HealthStub(channel)
    app[UPLOADS] = uploads.UploadCalls(channel)
    service = images_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
    app[GENERATE] = channels.unary(
        f"/{service}/GenerateImages", images_pb2.GenerateImagesRequest.SerializeToString
    )
    app[LIST_MODELS] = channels.unary(
        f"/{service}/ListModels", images_pb2.ListModelsRequest.SerializeToString
    )
    yield
    await channels.close()


async def generate_images(request: web.Request) -> web.StreamResponse:
    if http_input.body_encoded(request.headers):
        # Neither front decodes request bodies (Envoy would read them as they are).
        raise _Failure(errors.INVALID_JSON)
    try:
        async with asyncio.timeout(request.app[CONFIG].body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise _Failure(errors.REQUEST_TIMEOUT, close=True) from None
    try:
        message = parse_request(raw, images_pb2.GenerateImagesRequest())
    except InvalidJson:
        raise _Failure(errors.INVALID_JSON) from None
    if message.stream:
        # Same path, as OpenAI serves it; Envoy's Lua filter routes it the same way.
        call = request.app[STUB].StreamImages(message, **_call_options(request))
        return await sse.relay(request, call, {REQUEST_ID: request[REQUEST_ID_KEY]})
    reply = await request.app[GENERATE](message, **_call_options(request))
    return web.Response(
        body=response_json.images_body(reply), headers={"Content-Type": "application/json"}
    )


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
        async with asyncio.timeout(request.app[CONFIG].body_timeout_s):
            return await uploads.read_upload(
                request, request.app[CONFIG].max_upload_bytes, method, streamable=streamable
            )
    except TimeoutError:
        raise _Failure(errors.REQUEST_TIMEOUT, close=True) from None
    except uploads.TooLarge:
        raise _Failure(errors.TOO_LARGE) from None
    except uploads.Encoded:
        raise _Failure(errors.ENCODED_UPLOAD) from None


async def list_models(request: web.Request) -> web.Response:
    raw = await request.app[LIST_MODELS](images_pb2.ListModelsRequest(), **_call_options(request))
    return _json_bytes(200, _models_json(raw))


@functools.lru_cache(maxsize=64)
def _models_json(raw: bytes) -> bytes:
    """The JSON of a serialised ModelList. A key sees the same list every time, and
    printing nineteen models takes 0.2 ms: printed once per distinct reply."""
    return json_text.message_json(images_pb2.ModelList.FromString(raw))


async def get_model(request: web.Request) -> web.Response:
    message = images_pb2.GetModelRequest(model=_path_param(request))
    reply = await request.app[STUB].GetModel(message, **_call_options(request))
    return _json(reply)


async def get_image(request: web.Request) -> web.Response:
    message = images_pb2.GetImageRequest(
        image_id=_path_param(request),
        expires=_query(request, "expires"),
        signature=_query(request, "signature"),
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


# The account and admin calls: each a unary RPC whose request message takes the
# route's path variables (by segment index), query parameters and JSON body.


def _call(
    service: web.AppKey[Any],
    rpc: str,
    message_type: type[Message],
    *,
    path: tuple[tuple[str, int], ...] = (),
    query: tuple[str, ...] = (),
    body: str = "",
) -> Handler:
    """A handler calling `rpc` with a `message_type` made of the request's parts.

    path: request field <- index of the path segment ("/admin/v1/keys/x": 4 is "x");
    query: the query parameters read; body: "*" the JSON body is the whole message,
    a field's name that field (the proto's `body` of the HTTP rule), "" none.
    """

    async def handler(request: web.Request) -> web.Response:
        message = message_type()
        if body == "*":
            await _json_body(request, message)
        elif body:
            await _json_body(request, getattr(message, body))
        segments = _path(request).split("/")
        for name, index in path:
            setattr(message, name, http_input.path_param(segments[index]))
        for name in query:
            setattr(message, name, _query(request, name))
        stub = request.app[service]
        reply = await getattr(stub, rpc)(message, **_call_options(request))
        return _json(reply)

    return handler


ACCOUNT_ROUTES: tuple[tuple[str, str, Handler], ...] = (
    (
        "GET",
        "/v1/usage/daily",
        _call(STUB, "GetDailyUsage", images_pb2.GetDailyUsageRequest, query=("days",)),
    ),
    ("GET", "/v1/keys", _call(STUB, "ListOwnKeys", images_pb2.ListOwnKeysRequest)),
    ("POST", "/v1/keys", _call(STUB, "CreateOwnKey", images_pb2.CreateOwnKeyRequest, body="*")),
    (
        "DELETE",
        "/v1/keys/{key_id}",
        _call(STUB, "RevokeOwnKey", images_pb2.RevokeOwnKeyRequest, path=(("key_id", 3),)),
    ),
    ("GET", "/admin/v1/accounts", _call(ADMIN_STUB, "ListAccounts", admin_pb2.ListAccountsRequest)),
    (
        "POST",
        "/admin/v1/accounts",
        _call(ADMIN_STUB, "CreateAccount", admin_pb2.CreateAccountRequest, body="*"),
    ),
    (
        "GET",
        "/admin/v1/accounts/{account}",
        _call(ADMIN_STUB, "GetAccount", admin_pb2.GetAccountRequest, path=(("account", 4),)),
    ),
    (
        "POST",
        "/admin/v1/accounts/{account}/credit",
        _call(
            ADMIN_STUB,
            "CreditAccount",
            admin_pb2.CreditAccountRequest,
            path=(("account", 4),),
            body="credit",
        ),
    ),
    (
        "GET",
        "/admin/v1/keys",
        _call(ADMIN_STUB, "ListKeys", admin_pb2.ListKeysRequest, query=("account",)),
    ),
    (
        "POST",
        "/admin/v1/keys",
        _call(ADMIN_STUB, "CreateKey", admin_pb2.CreateKeyRequest, body="*"),
    ),
    (
        "PATCH",
        "/admin/v1/keys/{key_id}",
        _call(
            ADMIN_STUB,
            "UpdateKey",
            admin_pb2.UpdateKeyRequest,
            path=(("key_id", 4),),
            body="update",
        ),
    ),
    (
        "DELETE",
        "/admin/v1/keys/{key_id}",
        _call(ADMIN_STUB, "RevokeKey", admin_pb2.RevokeKeyRequest, path=(("key_id", 4),)),
    ),
    (
        "GET",
        "/admin/v1/usage",
        _call(ADMIN_STUB, "GetUsage", admin_pb2.GetUsageRequest, query=("account", "days")),
    ),
    (
        "GET",
        "/admin/v1/requests",
        _call(
            ADMIN_STUB,
            "ListRequests",
            admin_pb2.ListRequestsRequest,
            query=("account", "limit", "after"),
        ),
    ),
    (
        "GET",
        "/admin/v1/models",
        _call(ADMIN_STUB, "ListModelRoutes", admin_pb2.ListModelRoutesRequest),
    ),
)


async def _json_body(request: web.Request, message: M) -> M:
    """A JSON body into the request message, refused as generate_images refuses it."""
    if http_input.body_encoded(request.headers):
        raise _Failure(errors.INVALID_JSON)
    try:
        async with asyncio.timeout(request.app[CONFIG].body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise _Failure(errors.REQUEST_TIMEOUT, close=True) from None
    try:
        return parse_request(raw, message)
    except InvalidJson:
        raise _Failure(errors.INVALID_JSON) from None


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI, headers={"Content-Type": "application/json"})


async def _unrouted(request: web.Request) -> web.Response:
    # The middleware answers every path ROUTES lacks; aiohttp lands here only
    # if its decoding of a path disagrees with the raw match (a bug).
    raise _Failure(errors.UNKNOWN_URL, errors.unknown_url_message(request.method, _path(request)))


async def _expect(request: web.Request) -> None:
    """100-continue as aiohttp does; other expectations ignored, as Envoy ignores them."""
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11 and expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started


def _query(request: web.Request, name: str) -> str:
    """The last of repeated parameters, decoded as Envoy's transcoder binds them."""
    return http_input.query_value(request.rel_url.raw_query_string, name)


def _call_options(request: web.Request) -> dict[str, object]:
    metadata = [
        (name.decode(), value)
        for name in FORWARDED
        if (value := http_input.metadata_value(request.raw_headers, name)) is not None
    ]
    metadata += [
        (REQUEST_ID, request[REQUEST_ID_KEY]),
        # Where the client reached us, so image URLs point back here (the
        # front door has checked it as Envoy checks :authority).
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

    def __init__(
        self, row: errors.Row, message: str | None = None, *, close: bool = False, allow: str = ""
    ) -> None:
        self.row, self.message, self.close, self.allow = row, message, close, allow


def _path_param(request: web.Request) -> str:
    """The route's one variable, the last path segment, decoded as Envoy decodes it."""
    return http_input.path_param(_path(request).rpartition("/")[2])


def _path(request: web.Request) -> str:
    """The path as the client sent it, without the query (it may carry a signature)."""
    return request.rel_url.raw_path


def _route_check(request: web.Request) -> None:
    """404 or 405 by ROUTES, on the raw path, before aiohttp's own (decoding) router."""
    path = _path(request)
    allowed = [method for pattern, method in _ROUTES if pattern.search(path)]
    if not allowed:
        raise _Failure(errors.UNKNOWN_URL, errors.unknown_url_message(request.method, path))
    if request.method not in allowed:
        message = errors.wrong_method_message(request.method, path)
        raise _Failure(errors.WRONG_METHOD, message, allow=", ".join(allowed))


@web.middleware
async def request_id_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[REQUEST_ID_KEY] = http_input.request_id(request.headers)
    # The console's paths are its own (gateway/console.py), outside the REST surface.
    routed = not console.is_console(_path(request))
    response = await _answer(request, handler, routed=routed)
    if not response.prepared:  # a stream has sent its headers (x-request-id among them)
        response.headers[REQUEST_ID] = request[REQUEST_ID_KEY]
    return response


async def front_call(request: web.Request) -> web.StreamResponse:
    """The REST surface's answer to `request` (a clone the console made): the
    route check, the handler, and the error table, as for a request from outside."""
    match = await request.app.router.resolve(request)
    return await _answer(request, match.handler, routed=True)


async def _answer(request: web.Request, handler: Handler, *, routed: bool) -> web.StreamResponse:
    try:
        if routed:
            _route_check(request)
        return await handler(request)
    except _Failure as failure:
        body = errors.error_body(failure.row, failure.message)
        response = _json_bytes(
            failure.row.status, body, {"Allow": failure.allow} if failure.allow else None
        )
        if failure.close:
            response.force_close()
        return response
    except grpc.aio.AioRpcError as err:
        return _from_grpc(err)
    except web.HTTPException as exc:
        return _from_http(request, exc)
    except Exception:
        log.exception("request %s failed in the front", request[REQUEST_ID_KEY])
        return _json_bytes(errors.INTERNAL.status, errors.error_body(errors.INTERNAL))


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
    if exc.status == 413:
        return _json_bytes(errors.TOO_LARGE.status, errors.error_body(errors.TOO_LARGE))
    if exc.status == 404:
        message = errors.unknown_url_message(request.method, _path(request))
        return _json_bytes(
            errors.UNKNOWN_URL.status, errors.error_body(errors.UNKNOWN_URL, message)
        )
    raise exc
