"""What every fake upstream shares: a real aiohttp server on 127.0.0.1, a record of the
requests it got, and a queue of faults the test injects for the next requests.

A fake module subclasses FakeUpstream, adds its routes in `routes()`, and in each
handler first calls `await self.take_fault()`: transport-level faults (stall, reset)
are played here, and the provider-specific ones (500 with the provider's error body,
429 with Retry-After, safety refusal, malformed JSON, a URL outside the allowlist,
...) are returned for the handler to answer in the provider's own shape.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import enum
import io
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image


class Fault(enum.Enum):
    SERVER_ERROR = "500"
    RATE_LIMITED = "429"  # with Retry-After
    STALL = "stall"  # never answers within the client's timeout
    RESET = "reset"  # drops the connection without a reply
    MALFORMED = "malformed"  # 200 with a body that is not the provider's JSON
    SAFETY = "safety"  # the provider's own content-policy refusal
    BAD_REQUEST = "bad_request"  # the provider's refusal of the request itself
    AUTH = "auth"  # 401: our credentials refused
    POLL_FOREVER = "poll_forever"  # async providers: the job never finishes
    URL_OUTSIDE = "url_outside"  # output URL on a host outside the allowlist
    URL_METADATA = "url_metadata"  # output URL on 169.254.169.254
    OVERSIZE = "oversize"  # output over the download size cap
    EXTRA_IMAGES = "extra_images"  # more images than asked


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json: Any = None
    # Multipart or urlencoded fields; a file part is recorded as "<file>".
    form: dict[str, str] = field(default_factory=dict)


SEEN: web.RequestKey[Seen] = web.RequestKey("seen")


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (16, 16), seed: int = 0) -> bytes:
    """A small real image (distinct per seed), so decode checks pass."""
    out = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, 80, 160)).save(out, fmt)
    return out.getvalue()


class FakeUpstream:
    """Start with `await fake.start()`, stop with `await fake.stop()`."""

    # How long a STALL waits: longer than any timeout a test configures.
    stall_s = 30.0

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.faults: deque[Fault] = deque()
        # Base64 texts sent in place of the next reply's images, in order (a large image,
        # or one that is not base64); images past the end are the fake's own.
        self.image_texts: list[str] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> str:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def b64(self, index: int, data: bytes) -> str:
        """The base64 text of a reply's image `index`: `data`'s unless image_texts says."""
        if index < len(self.image_texts):
            return self.image_texts[index]
        return base64.b64encode(data).decode()

    def inject(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    async def take_fault(self, request: web.Request) -> Fault | None:
        """The next injected fault; STALL and RESET are played here and never return."""
        fault = self.faults.popleft() if self.faults else None
        if fault is Fault.STALL:
            await asyncio.sleep(self.stall_s)
        if fault is Fault.RESET:
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        return fault

    @staticmethod
    def seen(request: web.Request) -> Seen:
        """What the recorder parsed from this request (handlers read the body from here)."""
        return request[SEEN]

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        seen = Seen(
            request.method,
            request.path,
            dict(request.query),
            dict(request.headers),
            body,
        )
        ctype = request.headers.get("Content-Type", "")
        if ctype.startswith("application/json") and body:
            try:
                seen.json = json.loads(body)
            except ValueError:
                seen.json = None  # the handler answers the provider's 400
        elif ctype.startswith("multipart/form-data"):
            seen.form = parse_multipart(ctype, body)
        elif ctype.startswith("application/x-www-form-urlencoded"):
            seen.form = {k: str(v) for k, v in (await request.post()).items()}
        request[SEEN] = seen
        self.requests.append(seen)
        return await handler(request)


def parse_multipart(content_type: str, body: bytes) -> dict[str, str]:
    """The fields of a multipart/form-data body already read.

    request.post() cannot be used after request.read(): it parses the payload
    stream, which read() has consumed, and finds no boundary. The stdlib MIME
    parser reads the same bytes instead.
    """
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        return {}
    form: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        if part.get_filename() is not None:
            form[name] = "<file>"
            continue
        payload = part.get_payload(decode=True)
        raw = payload if isinstance(payload, bytes) else b""
        form[name] = raw.decode(part.get_content_charset() or "utf-8", errors="replace")
    return form
