"""Output images that fakes of URL-returning providers serve themselves, and the bad URLs
their faults put in their place: a reachable host outside the allowlist, the cloud metadata
address, and a file over the download size cap."""

from __future__ import annotations

import contextlib
import itertools

from aiohttp import web

from tests.fakes.base import Fault, image_bytes

METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
CONTENT_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "webp": "image/webp",
}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


class OutputFiles:
    """`GET /files/{name}` on the fake; `url()` stores an image and says where it is."""

    # Announced size of the oversize file: above any download cap a test configures
    # (the default cap is 50 MiB). It is streamed lazily, so nothing that big is held.
    oversize_bytes = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self._names = itertools.count()
        self.fetched: list[str] = []

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/files/{name}", self._get)

    def url(self, base_url: str, fmt: str, fault: Fault | None, seed: int = 0) -> str:
        """A URL for a new image in `fmt`, or the bad URL the fault asks for."""
        if fault is Fault.URL_METADATA:
            return METADATA_URL
        if fault is Fault.OVERSIZE:
            return f"{base_url}/files/oversize.png"
        name = f"out-{next(self._names)}.{fmt}"
        self.files[name] = (image_bytes(PIL_FORMATS[fmt], seed=seed), CONTENT_TYPES[fmt])
        if fault is Fault.URL_OUTSIDE:
            # Reachable and really an image: only the host allowlist refuses it.
            return f"{base_url.replace('127.0.0.1', 'localhost')}/files/{name}"
        return f"{base_url}/files/{name}"

    async def _get(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.fetched.append(name)
        if name == "oversize.png":
            return await self._oversize(request)
        if name not in self.files:
            raise web.HTTPNotFound()
        data, content_type = self.files[name]
        return web.Response(body=data, content_type=content_type)

    async def _oversize(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.content_length = self.oversize_bytes
        await response.prepare(request)
        chunk = image_bytes().ljust(1 << 16, b"\0")
        # The client hangs up once it sees the length (or the cap): stop writing then.
        with contextlib.suppress(ConnectionError):
            for _ in range(self.oversize_bytes // len(chunk)):
                await response.write(chunk)
        return response
