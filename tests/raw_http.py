"""Raw HTTP/1.x over a socket, for requests no client library will send.

Bytes go out exactly as written (`{host}` is replaced by the front's host:port);
the reply comes back as status, headers and body, after any 1xx interim replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]  # lower-case names; the last of repeated ones
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def host_of(base_url: str) -> str:
    return urlsplit(base_url).netloc


async def exchange(base_url: str, data: bytes, *, timeout_s: float = 15.0) -> RawReply:
    """Send `data` on a fresh connection and read one reply."""
    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data.replace(b"{host}", parts.netloc.encode()))
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            return await read_reply(reader, to_head=data.startswith(b"HEAD "))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_reply(reader: asyncio.StreamReader, *, to_head: bool = False) -> RawReply:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if status >= 200:
            break
    if to_head:  # a reply to HEAD has no body, whatever its Content-Length says
        body = b""
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return RawReply(status, headers, body)


async def closed_within(base_url: str, data: bytes, seconds: float) -> tuple[bool, bytes]:
    """Send `data`, then wait up to `seconds` for the server to close: (closed, what it sent)."""
    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    received = b""
    try:
        writer.write(data.replace(b"{host}", parts.netloc.encode()))
        await writer.drain()
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                received += chunk
        return True, received
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        return True, received
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
