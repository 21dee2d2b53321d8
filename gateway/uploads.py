"""Upload bodies (edits, variations): raw bytes under their own limit, passed on as HttpBody.

The service parses them (one parser for both fronts, as Envoy's transcoder
passes the same bytes). The app-wide client_max_size (1 MiB, for JSON) does not
apply here: the body is streamed in with a counter of its own and refused with
413 the moment it passes the upload limit, so no more than the limit is ever
held, whatever the client sends or claims. Tens of MB are joined and
serialized on a thread, and sent as bytes, so the event loop never copies them.

A streamed edit goes to its own RPC, as a streamed generation does: the front
looks at the one `stream` field to choose (stream_requested, which Envoy's Lua
filter mirrors), and leaves every other reading of the body to the service.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import Message
from imagegate.v1 import images_pb2

from gateway import http_input

CHUNK = 64 * 1024
SERVICE = images_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
# The upload RPCs and their request messages.
METHODS: dict[str, type[Message]] = {
    "EditImages": images_pb2.EditImagesRequest,
    "CreateImageVariation": images_pb2.CreateImageVariationRequest,
}
STREAM_EDIT = "StreamEditImages"
# A form part's name parameter for the `stream` field (not `filename="stream"`).
_NAME = b'name="stream"'
_STREAM_NAME = re.compile(rb"(?<![A-Za-z0-9_])" + re.escape(_NAME))
# The values the service reads as true (service/uploads.py).
_TRUE = (b"true", b"1")
# How far before `name=` the part's header line may start, and after it its headers
# and value may end (Envoy's Lua twin reads the same windows).
_NEAR = 1024
_HEADERS = 8192


class TooLarge(Exception):
    """The body is over the upload limit (by its Content-Length, or as it arrived)."""


class Encoded(Exception):
    """The body has a Content-Encoding: Envoy would pass it on compressed, aiohttp would
    decompress it, so neither front takes one."""


class UploadCalls:
    """The upload RPCs, called with requests already serialized (see read_upload)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._calls = {
            name: channel.unary_unary(
                f"/{SERVICE}/{name}",
                request_serializer=None,
                response_deserializer=images_pb2.ImagesResponse.FromString,
            )
            for name in METHODS
        }
        self._stream_edit = channel.unary_stream(
            f"/{SERVICE}/{STREAM_EDIT}",
            request_serializer=None,
            response_deserializer=images_pb2.ImageEvent.FromString,
        )

    async def call(self, method: str, request: bytes, **options: Any) -> images_pb2.ImagesResponse:
        reply: images_pb2.ImagesResponse = await self._calls[method](request, **options)
        return reply

    def stream_edit(self, request: bytes, **options: Any) -> Any:
        """StreamEditImages: a UnaryStreamCall of ImageEvents (gateway/sse.py relays it)."""
        return self._stream_edit(request, **options)


async def read_upload(
    request: web.Request, limit: int, method: str, *, streamable: bool = False
) -> tuple[bytes, bool]:
    """The serialized request message of `method` carrying the body as an HttpBody, and
    (`streamable`: edits) whether the body asks for a stream."""
    if http_input.body_encoded(request.headers):
        raise Encoded
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    content_type = request.headers.get("Content-Type", "")
    return await asyncio.to_thread(_prepare, METHODS[method], content_type, chunks, streamable)


def _prepare(
    message: type[Message], content_type: str, chunks: list[bytes], streamable: bool
) -> tuple[bytes, bool]:
    request: Any = message()
    request.body.content_type = content_type
    data = b"".join(chunks)
    chunks.clear()
    stream = streamable and stream_requested(content_type, data)
    # Set in place: building an HttpBody first would copy the data once more.
    request.body.data = data
    del data
    serialized: bytes = request.SerializeToString()
    return serialized, stream


def stream_requested(content_type: str, body: bytes) -> bool:
    """Whether an edit's body asks to be streamed: "stream": true in a JSON body, or a form
    part named "stream" whose value, trimmed, is true or 1 (any case), as the service reads
    it. Envoy's Lua filter applies the same rule (envoy.yaml: stream_requested)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        try:
            value = json.loads(body.decode("utf-8"), parse_constant=_refuse)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return False  # the service reports it
        return isinstance(value, dict) and value.get("stream") is True
    return any(_true_part(body, match.start()) for match in _STREAM_NAME.finditer(body))


def _true_part(body: bytes, at: int) -> bool:
    """The `name="stream"` at `at` is a part's Content-Disposition, and its value is true."""
    start = max(0, at - _NEAR)
    newline = body.rfind(b"\n", start, at)
    if newline < 0 and start > 0:
        return False  # no line start nearby: not a part's header
    if not body[newline + 1 : at].lower().startswith(b"content-disposition:"):
        return False
    after = body[at + len(_NAME) : at + len(_NAME) + _HEADERS]
    headers_end = after.find(b"\r\n\r\n")
    value_end = after.find(b"\r\n", headers_end + 4) if headers_end >= 0 else -1
    return value_end >= 0 and after[headers_end + 4 : value_end].strip().lower() in _TRUE


def _refuse(constant: str) -> object:
    raise ValueError(constant)
