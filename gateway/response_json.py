"""Reply bodies exactly as Envoy's transcoder prints them, without stalling the event loop.

An ImagesResponse may carry ten multi-megabyte images. Printing it whole on the
loop (MessageToDict, then escaping the whole text) froze every other request
for seconds; parsing it in a thread copied the images twice more, held the GIL
against the loop for 5-10 ms, and built the whole text before writing it. Here
a large reply's images are never parsed: their places in the reply's bytes are
found (gateway/images_wire.py), only the small skeleton goes through the JSON
printer, and the images' base64, which never needs escaping, is encoded and
written slice by slice on the loop, yielding between slices: the whole text
never exists at once, and no step holds the loop for more than a millisecond.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pybase64
from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter
from imagegate.v1 import images_pb2

from gateway import images_wire, json_text

# Bytes per base64 slice: a multiple of 3, so the slices' base64 joins without padding,
# and short enough to encode in about 0.15 ms (pybase64's SIMD codec: ~10 GB/s, ten
# times binascii), so the loop is never held for long, while the reply's whole text
# never exists at once.
_SLICE = 3 * 512 * 1024
# A reply this small is printed in one piece and written with the headers: tens of
# microseconds, less than the writes of a stream cost.
INLINE_BYTES = 64 * 1024
# What an emptied b64_json prints as; a JSON string value can never contain it
# (its inner quotes would be escaped), so it only ever marks an emptied field.
_MARK = b'"b64_json":""'
_OPEN, _CLOSE = b'"b64_json":"', b'"'


def images_body(raw: bytes) -> bytes | ImagesPayload:
    """The JSON of a serialised ImagesResponse: whole when small, else as a payload
    that encodes the images while it writes them (the same bytes)."""
    if len(raw) > INLINE_BYTES:
        skeleton, views = images_wire.split(raw)
        skeleton_json = json_text.message_json(images_pb2.ImagesResponse.FromString(skeleton))
        return ImagesPayload(_pieces(skeleton_json, len(views)), views)
    # Copies of a few kilobytes cost nothing, and upb's parser finds the images in
    # less time than walking the wire format in Python.
    message, images = _parsed(raw)
    pieces = _pieces(json_text.message_json(message), len(images))
    parts = [pieces[0]]
    for image, piece in zip(images, pieces[1:], strict=True):
        parts += [_OPEN, _base64(image), _CLOSE, piece]
    return b"".join(parts)


def _pieces(skeleton_json: bytes, images: int) -> list[bytes]:
    """The skeleton's JSON around each emptied b64_json."""
    pieces = skeleton_json.split(_MARK)
    if len(pieces) != images + 1:
        raise AssertionError("b64_json marks do not match the images")
    return pieces


def _parsed(raw: bytes) -> tuple[images_pb2.ImagesResponse, list[bytes]]:
    """The reply with every b64_json emptied (still set, so it prints its key), and them."""
    message = images_pb2.ImagesResponse.FromString(raw)
    images = []
    for item in message.data:
        if item.HasField("b64_json"):
            images.append(item.b64_json)
            item.b64_json = b""
    return message, images


def _base64(data: bytes | memoryview) -> bytes:
    """Standard padded base64, as protobuf's JSON printer writes bytes."""
    return pybase64.b64encode(data)


def _base64_length(size: int) -> int:
    return 4 * ((size + 2) // 3)


class ImagesPayload(payload.Payload):
    """A reply's JSON written piece, image slices, piece...: each slice of base64 is
    encoded just before it is written, and the write waits while the client is slow,
    so a request holds the reply's bytes and about one slice, not the whole text.
    Its size is known beforehand (Content-Length), as base64's length is."""

    def __init__(self, pieces: list[bytes], images: list[memoryview], **kwargs: Any) -> None:
        super().__init__(pieces, **kwargs)
        # texts[i] comes before images[i]; the last one after them all.
        self._texts = [pieces[0] + _OPEN if images else pieces[0]]
        for i, piece in enumerate(pieces[1:], 1):
            self._texts.append(_CLOSE + piece + (_OPEN if i < len(images) else b""))
        self._images = images
        self._size = sum(map(len, self._texts)) + sum(_base64_length(len(i)) for i in images)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        parts = [self._texts[0]]
        for image, text in zip(self._images, self._texts[1:], strict=True):
            parts += [_base64(image), text]
        return b"".join(parts).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        for text, image in zip(self._texts[:-1], self._images, strict=True):
            await writer.write(text)
            for start in range(0, len(image), _SLICE):
                await writer.write(_base64(image[start : start + _SLICE]))
                # The write awaits only a client slower than the socket; else the loop
                # would encode the whole reply before it ran anything else.
                await asyncio.sleep(0)
        await writer.write(self._texts[-1])
