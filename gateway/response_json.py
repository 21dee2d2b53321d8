"""Reply bodies exactly as Envoy's transcoder prints them, without stalling the event loop.

An ImagesResponse may carry ten multi-megabyte images. Printing it whole on the
loop (MessageToDict, then escaping the whole text) froze every other request
for seconds. Here it is parsed in a thread; only its small skeleton, whose
short text fields need escaping, goes through the JSON printer; the images'
base64, which never needs escaping, is built once, in slices short enough that
the loop gets the GIL back between them; the body is written as those parts.
"""

from __future__ import annotations

import asyncio
import binascii
from typing import Any

from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter
from imagegate.v1 import images_pb2

from gateway import json_text

# Bytes per base64 slice: a multiple of 3, so the slices' base64 joins without padding.
_SLICE = 3 * 128 * 1024
# A reply this small is printed on the loop: tens of microseconds, less than the
# hop to a thread and back costs.
INLINE_BYTES = 64 * 1024
# What an emptied b64_json prints as; a JSON string value can never contain it
# (its inner quotes would be escaped), so it only ever marks an emptied field.
_MARK = b'"b64_json":""'


async def images_parts(raw: bytes) -> list[bytes]:
    """The JSON of a serialised ImagesResponse, in parts (join them for Envoy's bytes).

    Parsing it, reading its images and encoding them all hold the GIL for as
    long as they copy megabytes: everything happens in a thread, in steps.
    """
    if len(raw) <= INLINE_BYTES:
        return _image_parts(raw)
    return await asyncio.to_thread(_image_parts, raw)


def _image_parts(raw: bytes) -> list[bytes]:
    message = images_pb2.ImagesResponse.FromString(raw)
    images = []
    for item in message.data:
        if item.HasField("b64_json"):
            images.append(item.b64_json)
            item.b64_json = b""  # still set, so the skeleton prints the key
    pieces = json_text.message_json(message).split(_MARK)
    if len(pieces) != len(images) + 1:
        raise AssertionError("b64_json marks do not match the images")
    parts = [pieces[0]]
    for image, piece in zip(images, pieces[1:], strict=True):
        parts += [b'"b64_json":"', *_base64_slices(image), b'"', piece]
    return parts


def _base64_slices(data: bytes) -> list[bytes]:
    """Standard padded base64 (as protobuf's JSON printer writes bytes), slice by slice."""
    view = memoryview(data)
    return [
        binascii.b2a_base64(view[i : i + _SLICE], newline=False)
        for i in range(0, len(view), _SLICE)
    ]


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
