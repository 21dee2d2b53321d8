"""Upload bodies (edits, variations): raw bytes under their own limit, passed on as HttpBody.

The service parses them (one parser for both fronts, as Envoy's transcoder
passes the same bytes). The app-wide client_max_size (1 MiB, for JSON) does not
apply here: the body is streamed in with a counter of its own and refused with
413 the moment it passes the upload limit, so no more than the limit is ever
held, whatever the client sends or claims. Tens of MB are joined and
serialized on a thread, and sent as bytes, so the event loop never copies them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import Message
from imagegate.v1 import images_pb2

CHUNK = 64 * 1024
SERVICE = images_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
# The upload RPCs and their request messages.
METHODS: dict[str, type[Message]] = {
    "EditImages": images_pb2.EditImagesRequest,
    "CreateImageVariation": images_pb2.CreateImageVariationRequest,
}


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

    async def call(self, method: str, request: bytes, **options: Any) -> images_pb2.ImagesResponse:
        reply: images_pb2.ImagesResponse = await self._calls[method](request, **options)
        return reply


async def read_upload(request: web.Request, limit: int, method: str) -> bytes:
    """The serialized request message of `method` carrying the body as an HttpBody."""
    if _encoded(request.headers.get("Content-Encoding", "")):
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
    return await asyncio.to_thread(_serialize, METHODS[method], content_type, chunks)


def _serialize(message: type[Message], content_type: str, chunks: list[bytes]) -> bytes:
    request: Any = message()
    request.body.content_type = content_type
    # Set in place: building an HttpBody first would copy the data once more.
    request.body.data = b"".join(chunks)
    chunks.clear()
    serialized: bytes = request.SerializeToString()
    return serialized


def _encoded(header: str) -> bool:
    codings = [c.strip().lower() for c in header.split(",")]
    return any(c not in ("", "identity") for c in codings)
