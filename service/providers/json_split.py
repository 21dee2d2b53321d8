"""A large JSON reply read as it arrives: its structure kept as text, its long strings
taken out piece by piece, and the images under one key (`b64_json`, `image`, ...: its
value, or the strings of its array) decoded from base64 on the way.

json.loads of an 8 MB reply of four images, then b64decode of each, are single C
calls of 10-30 ms that hold the GIL (a thread does not spare the event loop) and
keep the body, its text and the images alive together. Here each chunk costs a few
finds and the strict base64 decoding of at most its own bytes, the body is dropped
as it is read, and what is left to json.loads is the structure with each long string
replaced by a mark: a few hundred bytes.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import pybase64

from service import b64
from service.aio import INLINE_BYTES, off_loop
from service.providers.http import (
    MAX_REPLY_BYTES,
    decode_image_b64,
    image_type,
    invalid_base64,
    read_body,
    reply_too_large,
)

# A string longer than this leaves the structure (json.loads of a shorter one is cheap).
LONG = INLINE_BYTES
READ_CHUNK = 1 << 16
# Work on the loop between two chances for other tasks to run.
SLICE_S = 0.001
# Long strings are marked "\u0000<nonce>:<index>": no upstream can guess the nonce.
_MARK = "\x00" + secrets.token_hex(8) + ":"
_MARK_JSON = _MARK.replace("\x00", "\\u0000").encode()
_BACKSLASH = 0x5C
_PAD = 0x3D
# What may come between two strings of one array of strings (no bracket, no brace).
_NESTING = (b"[", b"]", b"{", b"}")
T = TypeVar("T")


@dataclass(frozen=True)
class Base64Value:
    """An image's base64 decoded as it arrived: its bytes, or None if not valid base64."""

    data: bytes | None

    def image(self, provider_id: str) -> tuple[bytes, str]:
        """Its bytes and MIME type, or the UpstreamError decode_image_b64 would raise."""
        if self.data is None:
            raise invalid_base64(provider_id)
        return self.data, image_type(self.data, provider_id)


def image_of(value: object, provider_id: str) -> tuple[bytes, str]:
    """An image in a reply read by read_reply (a Base64Value if it was long, else the
    text): its bytes and MIME type, or the UpstreamError decode_image_b64 raises."""
    if isinstance(value, Base64Value):
        return value.image(provider_id)
    return decode_image_b64(value, provider_id)


def loads(body: bytes | SplitJson) -> Any:
    """What read_reply read, as json.loads returns it (images as image_of takes them);
    ValueError if it is not JSON."""
    return json.loads(body) if isinstance(body, bytes) else body.result()


async def parsed(fn: Callable[..., T], body: bytes | SplitJson, *args: Any) -> T:
    """fn(body, *args) on the loop when what is left to parse is small (a small reply, or
    a large one's structure, its images decoded already), else in a thread."""
    size = len(body) if isinstance(body, bytes) else body.frame_size
    return await off_loop(size, fn, body, *args)


async def read_reply_or_raise(
    response: aiohttp.ClientResponse,
    provider_id: str,
    decode_key: bytes,
    failure: Callable[[int, Mapping[str, str], bytes], Exception],
) -> bytes | SplitJson:
    """A 200's body as read_reply reads it; any other status's body read whole (error
    bodies are small) and raised as the error `failure` makes of it."""
    if response.status != 200:
        raise failure(response.status, response.headers, await read_body(response, provider_id))
    return await read_reply(response, provider_id, decode_key)


async def read_reply(
    response: aiohttp.ClientResponse,
    provider_id: str,
    decode_key: bytes = b"b64_json",
    limit: int = MAX_REPLY_BYTES,
) -> bytes | SplitJson:
    """The body as bytes while it fits in INLINE_BYTES (json.loads is the cheapest there);
    a longer one read into a SplitJson(decode_key) as it arrives, pausing for the loop
    every SLICE_S."""
    length = response.content_length
    if length is not None and length > limit:
        raise reply_too_large(provider_id)
    chunks: list[bytes] = []
    size = 0
    split: SplitJson | None = None
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise reply_too_large(provider_id)
        if split is None:
            chunks.append(chunk)
            if size <= INLINE_BYTES:
                continue
            split, chunk = SplitJson(decode_key), b"".join(chunks)
            chunks.clear()
            resumed = time.perf_counter()
        split.feed(chunk)
        # Chunks already received come without a pause: make one. (Reading from the
        # network may have paused already; then this one costs a few microseconds.)
        if time.perf_counter() - resumed > SLICE_S:
            await asyncio.sleep(0)
            resumed = time.perf_counter()
    return b"".join(chunks) if split is None else split


class SplitJson:
    """Feed a JSON document chunk by chunk; `result()` is what json.loads would return,
    except that strings over LONG that are decode_key's value, or strings of its array
    value, are Base64Value."""

    def __init__(self, decode_key: bytes = b"b64_json") -> None:
        self._decode_key = decode_key
        # The document outside its long strings, each replaced by a mark.
        self._frame = bytearray()
        self._values: list[object] = []
        self._invalid = False
        self._in_string = False
        # The string being read: short pieces, or the long string they became.
        self._pieces: list[bytes] = []
        self._size = 0
        self._long: _LongString | None = None
        # The string read so far ends in an odd run of backslashes: its next byte is escaped.
        self._escaped = False
        # Whether the last string was decode_key (a key, if a colon follows), and where
        # the frame stood after it.
        self._after_key = False
        self._key_end = 0
        # Strings read so far are those of decode_key's array: the next one may be too.
        self._in_array = False
        # The string being read is decode_key's value or a string of its array.
        self._decoded = False

    @property
    def frame_size(self) -> int:
        return len(self._frame)

    def feed(self, chunk: bytes) -> None:
        pos, end = 0, len(chunk)
        while pos < end:
            if not self._in_string:
                quote = chunk.find(b'"', pos)
                self._frame += memoryview(chunk)[pos : end if quote < 0 else quote]
                if quote < 0:
                    return
                self._in_string, self._escaped = True, False
                self._open_string()
                pos = quote + 1
                continue
            quote = self._closing_quote(chunk, pos)
            piece = chunk[pos : end if quote < 0 else quote]
            if piece:
                self._piece(piece)
            if quote < 0:
                self._escaped = _odd_backslashes(piece, self._escaped)
                return
            self._end_string()
            pos = quote + 1

    def result(self) -> Any:
        """The document, long strings put back; ValueError if it is not JSON."""
        if self._in_string or self._invalid:
            raise ValueError("not JSON")
        document = json.loads(self._frame)
        return self._restore(document) if self._values else document

    def _closing_quote(self, chunk: bytes, pos: int) -> int:
        """The first quote from `pos` that no backslash escapes, or -1."""
        quote = chunk.find(b'"', pos)
        while quote >= 0:
            if quote == pos or chunk[quote - 1] != _BACKSLASH:
                run = 0
            else:
                run = quote - pos - len(chunk[pos:quote].rstrip(b"\\"))
            if run == quote - pos and self._escaped:
                run += 1
            if run % 2 == 0:
                return quote
            quote = chunk.find(b'"', quote + 1)
        return -1

    def _open_string(self) -> None:
        """Whether the string opening is decode_key's value (`"key":` before it) or one
        of its array's strings (`"key": [`, then strings, commas, scalars only)."""
        if not (self._after_key or self._in_array):
            self._decoded = False
            return
        gap = self._frame[self._key_end :]
        if self._in_array and not any(mark in gap for mark in _NESTING):
            self._decoded = True
            return
        after = b"".join(gap.split()) if self._after_key else b""
        self._in_array = after == b":["
        self._decoded = self._in_array or after == b":"

    def _piece(self, piece: bytes) -> None:
        if self._long is not None:
            self._long.feed(piece)
            return
        self._pieces.append(piece)
        self._size += len(piece)
        if self._size > LONG:
            self._long = _LongString(self._decoded)
            self._long.feed(b"".join(self._pieces))
            self._pieces = []

    def _end_string(self) -> None:
        self._in_string = False
        if self._long is not None:
            value, valid = self._long.end()
            self._invalid |= not valid
            self._frame += b'"' + _MARK_JSON + str(len(self._values)).encode() + b'"'
            self._values.append(value)
            self._long, self._after_key, self._size = None, False, 0
        else:
            raw = b"".join(self._pieces)
            self._frame += b'"' + raw + b'"'
            self._after_key = raw == self._decode_key
            self._pieces, self._size = [], 0
        self._key_end = len(self._frame)

    def _restore(self, value: Any) -> Any:
        if isinstance(value, str):
            if value.startswith(_MARK):
                return self._values[int(value[len(_MARK) :])]
            return value
        if isinstance(value, dict):
            return {key: self._restore(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._restore(item) for item in value]
        return value


class _LongString:
    """One string over LONG, fed raw (still JSON-escaped): its text, or if it is an
    image (SplitJson's decode_key), its bytes decoded as they come while it has no escape."""

    def __init__(self, base64_value: bool) -> None:
        self._base64 = _Base64() if base64_value else None
        self._texts: list[str] = []
        # The end of the last piece, where an escape or a UTF-8 character may go on.
        self._held = b""
        self._valid = True
        # The base64 kept for the end came as it was sent (not out of json's decoding).
        self._raw_rest = False

    def feed(self, raw: bytes) -> None:
        if self._held:
            raw, self._held = self._held + raw, b""
        decoder = self._base64
        # Valid base64 is valid JSON text as it is; only escapes need json's decoding.
        if decoder is not None and decoder.valid and b"\\" not in raw:
            if decoder.feed(raw):
                self._raw_rest = True
                return
            # Not base64; whether it is JSON text decides which error the reply gets (the
            # characters kept from before were checked already if json decoded them).
            raw = decoder.refused if self._raw_rest else raw
        cut = _safe_cut(raw)
        self._held = raw[cut:]
        self._text(raw[:cut])

    def end(self) -> tuple[object, bool]:
        """(Its text or Base64Value, whether it was valid JSON text.)"""
        if self._held:
            self._text(self._held)
        decoder = self._base64
        if decoder is None:
            return "".join(self._texts), self._valid
        data = decoder.end()
        if data is None and self._raw_rest:
            self._text(decoder.refused)
        return Base64Value(data), self._valid

    def _text(self, raw: bytes) -> None:
        if not self._valid or not raw:
            return
        try:
            text = json.loads(b'"' + raw + b'"')
        except ValueError:
            self._valid = False
            return
        decoder = self._base64
        if decoder is None:
            self._texts.append(text)
        elif decoder.valid:
            self._raw_rest = False
            if text.isascii():
                decoder.feed(text.encode("ascii"))
            else:
                decoder.valid = False


class _Base64:
    """Strict base64 (as b64decode(validate=True)) decoded in pieces: whole quads without
    padding as they come, the last 5-8 characters kept for the end, so that padding is
    taken only there. It refuses what b64decode would take only with 5 or more '='."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.valid = True
        # What it was given when it found it was not base64.
        self.refused = b""
        self._rest = b""

    def feed(self, data: bytes) -> bool:
        if self._rest:
            data, self._rest = self._rest + data, b""
        whole = max(0, (len(data) - 5) // 4 * 4)
        if whole:
            try:
                # pybase64: SIMD, a tenth of binascii's time; strict as strict_mode.
                self.parts.append(pybase64.b64decode(memoryview(data)[:whole], validate=True))
            except binascii.Error:
                return self._refuse(data)
            # Strict mode takes padding at the end of a piece; the string goes on after it.
            if data[whole - 1] == _PAD:
                return self._refuse(data)
        self._rest = data[whole:]
        return True

    def end(self) -> bytes | None:
        if not self.valid:
            return None
        try:
            self.parts.append(b64.decode(self._rest))
        except (binascii.Error, ValueError):
            self._refuse(self._rest)
            return None
        data = b"".join(self.parts)
        self.parts.clear()
        return data

    def _refuse(self, data: bytes) -> bool:
        self.valid, self.refused = False, data
        self.parts.clear()
        return False


def _odd_backslashes(piece: bytes, before: bool) -> bool:
    """Whether the string ends in an odd run of backslashes after `piece` (`before`:
    whether it did before it)."""
    if not piece or piece[-1] != _BACKSLASH:
        return before and not piece
    run = len(piece) - len(piece.rstrip(b"\\"))
    return (run % 2 == 1) != (before and run == len(piece))


def _safe_cut(raw: bytes) -> int:
    """Where `raw` (whole escapes from its start) can be cut with no escape or UTF-8
    character split: the text before it decodes alone."""
    cut = len(raw)
    backslash = raw.rfind(b"\\", max(0, cut - 6))
    if backslash >= 0:
        # The run of backslashes ending there: pairs are whole escapes, an odd one opens one.
        run = backslash + 1 - len(raw[: backslash + 1].rstrip(b"\\"))
        cut = backslash + 1 if run % 2 == 0 else backslash
    # Back over a UTF-8 character's continuation bytes and its lead byte.
    start = cut
    while start > 0 and cut - start < 3 and 0x80 <= raw[start - 1] < 0xC0:
        start -= 1
    if start > 0 and raw[start - 1] >= 0xC0:
        start -= 1
    return start
