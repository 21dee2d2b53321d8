"""Reply bodies exactly as Envoy's transcoder prints them, without stalling the event loop.

An ImagesResponse may carry ten multi-megabyte images. Printing it whole on the
loop (MessageToDict, then escaping the whole text) froze every other request
for seconds. Here only the small skeleton, whose short text fields need
escaping, is printed on the loop; the images' base64, which never needs
escaping, is built once, in a thread, in slices short enough that the loop
gets the GIL back between them, and the body is written as those parts.
"""

from __future__ import annotations

import asyncio
import binascii
from typing import Any

from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter
from google.protobuf import json_format
from google.protobuf.message import Message
from imagegate.v1 import images_pb2

from gateway import json_text

# Below this many protobuf bytes a reply is printed in one go on the loop (< 1 ms).
SMALL_BYTES = 64 * 1024
# Bytes per base64 slice: a multiple of 3, so the slices' base64 joins without padding.
_SLICE = 3 * 128 * 1024
# What an emptied b64_json prints as; a JSON string value can never contain it
# (its inner quotes would be escaped), so it only ever marks an emptied field.
_MARK = b'"b64_json":""'


def dumps(message: Message) -> bytes:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return json_text.dumps(data)


async def json_parts(message: Message) -> list[bytes]:
    """The JSON body in parts; join them for the bytes Envoy would send."""
    if not isinstance(message, images_pb2.ImagesResponse) or message.ByteSize() < SMALL_BYTES:
        return [dumps(message)]
    images = []
    for item in message.data:
        if item.HasField("b64_json"):
            images.append(item.b64_json)
            item.b64_json = b""  # still set, so the skeleton prints the key
    pieces = dumps(message).split(_MARK)
    if len(pieces) != len(images) + 1:
        raise AssertionError("b64_json marks do not match the images")
    encoded = await asyncio.to_thread(_base64_slices, images)
    parts = [pieces[0]]
    for slices, piece in zip(encoded, pieces[1:], strict=True):
        parts += [b'"b64_json":"', *slices, b'"', piece]
    return parts


def _base64_slices(images: list[bytes]) -> list[list[bytes]]:
    """Standard padded base64 of each image (as protobuf's JSON printer writes bytes)."""
    result = []
    for data in images:
        view = memoryview(data)
        result.append(
            [
                binascii.b2a_base64(view[i : i + _SLICE], newline=False)
                for i in range(0, len(view), _SLICE)
            ]
        )
    return result


class PartsPayload(payload.Payload):
    """A response body written part by part, never joined into one buffer."""

    def __init__(self, parts: list[bytes], **kwargs: Any) -> None:
        super().__init__(parts, **kwargs)
        self._parts = parts
        self._size = sum(len(part) for part in parts)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._parts).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        for part in self._parts:
            await writer.write(part)
