"""Server-sent events from an upstream reply, read as they arrive (size-capped).

aiohttp's readline() refuses lines over its buffer limit (~128 KiB), and an
image event is one `data:` line of megabytes, so the body is split here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from service.errors import UpstreamError
from service.providers.http import MAX_REPLY_BYTES

_BOUNDARIES = (b"\r\n\r\n", b"\n\n")
# SSE line ends only (str.splitlines() would also split at U+2028 inside JSON strings).
_LINES = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    event: str | None
    data: str


async def read_blocks(
    response: aiohttp.ClientResponse, provider_id: str, limit: int = MAX_REPLY_BYTES
) -> AsyncIterator[bytes]:
    """Each event's raw block as soon as its blank line has arrived (`parse` reads it:
    off the event loop for big ones); UpstreamError if the reply grows over `limit`."""
    buffer = bytearray()
    total = 0
    async for chunk in response.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise UpstreamError(
                f"The upstream provider '{provider_id}' sent a stream over {limit} bytes."
            )
        # Only the new bytes (and the 3 before them) can complete a boundary.
        start = max(0, len(buffer) - 3)
        buffer.extend(chunk)
        while (cut := _boundary(buffer, start)) is not None:
            end, skip = cut
            block = bytes(buffer[:end])
            del buffer[: end + skip]
            start = 0
            yield block
    if buffer.strip():
        yield bytes(buffer)


def _boundary(buffer: bytearray, start: int) -> tuple[int, int] | None:
    found = [(i, len(b)) for b in _BOUNDARIES if (i := buffer.find(b, start)) >= 0]
    return min(found) if found else None


def parse(block: bytes) -> Event | None:
    """One event's lines, as the SSE specification reads them (no id/retry needed here);
    None for a block of comments only."""
    event: str | None = None
    data: list[str] = []
    for line in _LINES.split(block.decode("utf-8", "replace")):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if event is None and not data:
        return None
    return Event(event, "\n".join(data))
