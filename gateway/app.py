"""The aiohttp front: OpenAI-shaped REST in, ImageService gRPC out, by transcoding alone."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from aiohttp import web
from google.api import httpbody_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegate.v1 import images_pb2, images_pb2_grpc

from gateway import errors, json_text
from gateway.config import GatewayConfig

log = logging.getLogger("imagegate.gateway")

STUB: web.AppKey[images_pb2_grpc.ImageServiceStub] = web.AppKey("stub")
CONFIG: web.AppKey[GatewayConfig] = web.AppKey("config")
REQUEST_ID = "x-request-id"
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("request_id")
# Request headers passed to the service as gRPC metadata, as Envoy does.
FORWARDED = ("authorization", "idempotency-key")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(config: GatewayConfig) -> web.Application:
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[request_id_and_errors]
    )
    app[CONFIG] = config
    app.cleanup_ctx.append(_channel)
    app.router.add_post("/v1/images/generations", generate_images)
    app.router.add_get("/v1/models", list_models, allow_head=False)
    app.router.add_get("/v1/images/files/{image_id}", get_image, allow_head=False)
    return app


async def _channel(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    size = config.max_message_bytes
    channel = grpc.aio.insecure_channel(
        config.grpc_target,
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
    )
    app[STUB] = images_pb2_grpc.ImageServiceStub(channel)
    yield
    await channel.close()


async def generate_images(request: web.Request) -> web.Response:
    message = _parse_body(await request.read(), images_pb2.GenerateImagesRequest())
    reply = await request.app[STUB].GenerateImages(message, **_call_options(request))
    return _json(reply)


async def list_models(request: web.Request) -> web.Response:
    reply = await request.app[STUB].ListModels(
        images_pb2.ListModelsRequest(), **_call_options(request)
    )
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


def _parse_body(raw: bytes, message: Message) -> Message:
    """Strict JSON -> protobuf, refusing exactly what the Envoy front refuses.

    Unknown fields are ignored and an empty body is {}, as with Envoy's
    transcoder; like OpenAI (and Envoy's Lua filter) a known field must have
    its JSON type, so "n": "3" is refused although proto3 JSON would take it.
    """
    try:
        text = raw.decode("utf-8")
        if not text.strip(_JSON_SPACE):
            data: object = {}
        else:
            data = json.loads(
                text, parse_constant=_refuse, parse_float=_finite, parse_int=_finite_int
            )
        if not isinstance(data, dict) or _depth(data) > MAX_DEPTH:
            raise ValueError("not a JSON object, or nested too deeply")
        # Lone surrogates (\ud800) parse but cannot be UTF-8: refuse them.
        json.dumps(data, ensure_ascii=False).encode()
        for name, value in data.items():
            kind = _FIELD_KINDS.get(name)
            if kind is not None and value is not None and not _is_kind(value, kind):
                raise ValueError(f"wrong JSON type for {name}")
        json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except (ValueError, UnicodeError, json_format.ParseError, RecursionError):
        raise _Failure(errors.INVALID_JSON) from None
    return message


_JSON_SPACE = " \t\n\r\v\f"
# Nesting levels allowed, the root object counting as one (Envoy's transcoder limit).
MAX_DEPTH = 100
_KIND_OF_TYPE = {
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_INT32: int,
}
# JSON type of each GenerateImagesRequest field, by proto name and JSON (camelCase) name.
_FIELD_KINDS: dict[str, type] = {
    name: _KIND_OF_TYPE[field.type]
    for field in images_pb2.GenerateImagesRequest.DESCRIPTOR.fields
    for name in (field.name, field.json_name)
}


def _is_kind(value: object, kind: type) -> bool:
    if kind is int:  # any JSON number; ParseDict then refuses fractions
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def _refuse(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _finite_int(text: str) -> int:
    value = int(text)
    if abs(value) > sys.float_info.max:  # Envoy reads every number as a double
        raise ValueError("number out of range")
    return value


def _depth(value: object) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _call_options(request: web.Request) -> dict[str, object]:
    metadata = [(name, request.headers[name]) for name in FORWARDED if name in request.headers]
    metadata += [
        (REQUEST_ID, request[REQUEST_ID_KEY]),
        # Where the client reached us, so image URLs point back here.
        ("x-forwarded-host", request.host),
        ("x-forwarded-proto", request.scheme),
    ]
    return {"metadata": metadata, "timeout": request.app[CONFIG].timeout_s}


def _json(message: Message) -> web.Response:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _json_bytes(200, json_text.dumps(data))


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
    response.headers[REQUEST_ID] = request[REQUEST_ID_KEY]
    # The path only: a query may carry an image URL's signature.
    log.info(
        "%s %s %d request_id=%s",
        request.method,
        request.rel_url.raw_path,
        response.status,
        request[REQUEST_ID_KEY],
    )
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
