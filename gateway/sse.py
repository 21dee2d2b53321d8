"""Streamed generations as server-sent events, byte for byte what Envoy's front writes.

Each ImageEvent of the StreamImages RPC becomes `event: <type>\\ndata: <json>\\n\\n`
as it arrives (OpenAI's framing; the JSON as the transcoder prints it). An error
before the first event is an ordinary error response (the caller raises it to the
error middleware); an "error" event after it carries the service's status, which
becomes OpenAI's error object by the front's error table. A service that vanishes
mid-stream without one (crash, deadline) breaks the transfer, as with Envoy.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from aiohttp import web
from google.rpc import error_details_pb2, status_pb2
from imagegate.v1 import images_pb2

from gateway import errors, json_text

log = logging.getLogger("imagegate.gateway")
CONTENT_TYPE = "text/event-stream"
# Events bigger than this (images) are printed off the event loop.
_INLINE_BYTES = 64 * 1024
_CODES = {code.value[0]: code for code in grpc.StatusCode}


async def relay(
    request: web.Request,
    call: grpc.aio.UnaryStreamCall[images_pb2.GenerateImagesRequest, images_pb2.ImageEvent],
    headers: dict[str, str],
) -> web.StreamResponse:
    """Answer with the call's events as they come; cancel the call if the client goes."""
    finished = False
    try:
        message = await call.read()  # an error here propagates: an ordinary error response
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE, **headers})
        await response.prepare(request)
        try:
            ended = await _relay_events(response, call, message)
            if ended:
                await response.write_eof()
        except ConnectionResetError:
            return response  # the client went away: the call is cancelled below
        finished = True
        if not ended and request.transport is not None:
            # The service went away mid-stream without an error event (crash, deadline):
            # stop short of the last chunk, as Envoy then does, so that clients see a
            # broken transfer rather than a stream that merely ended.
            request.transport.close()
        return response
    finally:
        if not finished:
            call.cancel()


async def _relay_events(
    response: web.StreamResponse,
    call: grpc.aio.UnaryStreamCall[images_pb2.GenerateImagesRequest, images_pb2.ImageEvent],
    message: images_pb2.ImageEvent | object,
) -> bool:
    """Write events until the stream ends (True) or fails without an error event (False)."""
    try:
        while isinstance(message, images_pb2.ImageEvent):
            await response.write(await _frame(message))
            if message.type == "error":
                return True  # the status that follows says the same
            message = await call.read()
    except grpc.aio.AioRpcError as err:
        log.warning("stream ended by %s without an error event", err.code().name)
        return False
    return True


async def _frame(message: images_pb2.ImageEvent) -> bytes:
    if message.type == "error":
        return _error_frame(message.error)
    if message.ByteSize() > _INLINE_BYTES:
        data = await asyncio.to_thread(json_text.message_json, message)
    else:
        data = json_text.message_json(message)
    return b"".join((b"event: ", message.type.encode(), b"\ndata: ", data, b"\n\n"))


def _error_frame(status: status_pb2.Status) -> bytes:
    """OpenAI's error object under "error", so the SDKs raise it (Envoy's Lua twin: sse_error)."""
    info = _error_info(status)
    if info is None:
        row = errors.BY_CODE.get(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), errors.INTERNAL)
        error = errors.error_object(row)
    else:
        row = errors.BY_REASON.get(info.reason, errors.INTERNAL)
        error = errors.error_object(
            row,
            message=status.message if row is not errors.INTERNAL else None,
            param=info.metadata.get("param"),
            code=info.metadata.get("code"),
        )
    data = json_text.dumps({"type": "error", "error": error})
    return b"event: error\ndata: " + data + b"\n\n"


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == "imagegate":
            return info
    return None
