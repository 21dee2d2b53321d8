"""Upload bodies (edits, variations): raw bytes under their own limit, passed on as HttpBody.

The service parses them (one parser for both fronts, as Envoy's transcoder
passes the same bytes). The app-wide client_max_size (1 MiB, for JSON) does not
apply here: the body is streamed in with a counter of its own and refused with
413 the moment it passes the upload limit, so no more than the limit is ever
held, whatever the client sends or claims.
"""

from __future__ import annotations

from aiohttp import web
from google.api import httpbody_pb2

CHUNK = 64 * 1024


class TooLarge(Exception):
    """The body is over the upload limit (by its Content-Length, or as it arrived)."""


class Encoded(Exception):
    """The body has a Content-Encoding: Envoy would pass it on compressed, aiohttp would
    decompress it, so neither front takes one."""


async def read_upload(request: web.Request, limit: int) -> httpbody_pb2.HttpBody:
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
    data = b"".join(chunks)
    del chunks
    return httpbody_pb2.HttpBody(content_type=request.headers.get("Content-Type", ""), data=data)


def _encoded(header: str) -> bool:
    codings = [c.strip().lower() for c in header.split(",")]
    return any(c not in ("", "identity") for c in codings)
