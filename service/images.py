"""Images served by URL: stored in an image backend, behind HMAC-signed expiring links."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from service.errors import ImageNotFound
from service.imagestore.base import ImageBackend
from service.imagestore.local import LocalFiles
from service.private import create_private, private_dir

ROUTE = "/v1/images/files/"
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
CONTENT_TYPES = {ext: ctype for ctype, ext in EXTENSIONS.items()}
# 24 random bytes, URL-safe: unguessable even without the signature.
_ID_BYTES = 24
log = logging.getLogger("imagegate.images")
NOT_FOUND = "No such image, or its link has expired or was altered."


class ImageStore:
    """Image ids, signed expiring links, all-or-nothing writes; the bytes live in a
    backend (service/imagestore/): a folder (a Path here) or an S3 bucket."""

    def __init__(
        self,
        backend: ImageBackend | Path,
        secret: bytes,
        ttl_s: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backend = LocalFiles(backend) if isinstance(backend, Path) else backend
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    async def put(self, data: bytes, content_type: str) -> str:
        image_id = _new_id(content_type)
        await self._backend.write(image_id, data, content_type)
        return image_id

    async def put_all(self, images: Sequence[tuple[bytes, str]]) -> list[str]:
        """Store every image or none: if one write fails, or the caller is cancelled,
        every image of the call is deleted before this raises."""
        ids = [_new_id(content_type) for _, content_type in images]
        writes = asyncio.gather(
            *(
                self._backend.write(image_id, data, content_type)
                for image_id, (data, content_type) in zip(ids, images, strict=True)
            ),
            return_exceptions=True,
        )
        cancelled = False
        while True:
            try:
                # The writes run on in their threads whatever happens to us: wait for
                # them, so that what they wrote is deleted after, not left behind.
                results = await asyncio.shield(writes)
                break
            except asyncio.CancelledError:
                if writes.cancelled():
                    raise
                cancelled = True
        failures = [r for r in results if isinstance(r, BaseException)]
        if cancelled or failures:
            try:
                await self._backend.delete(ids)
            except Exception:
                log.warning("could not delete the images of a failed request; the sweep will")
            if cancelled:
                raise asyncio.CancelledError
            raise failures[0]
        return ids

    def signed_path(self, image_id: str) -> str:
        """The path and query of a link valid for ttl_s from now."""
        expires = str(int(self._clock()) + self.ttl_s)
        return f"{ROUTE}{image_id}?expires={expires}&signature={self._sign(image_id, expires)}"

    def _sign(self, image_id: str, expires: str) -> str:
        message = f"{image_id}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    async def get(self, image_id: str, expires: str, signature: str) -> tuple[bytes, str]:
        """The image bytes and MIME type, or ImageNotFound for any bad or stale link."""
        valid = (
            expires.isdigit()
            and int(expires) >= self._clock()
            and hmac.compare_digest(self._sign(image_id, expires), signature)
        )
        ext = image_id.rpartition(".")[2]
        if not valid or ext not in CONTENT_TYPES or "/" in image_id or image_id.startswith("."):
            raise ImageNotFound(NOT_FOUND)
        data = await self._backend.read(image_id)
        if data is None:
            raise ImageNotFound(NOT_FOUND)
        return data, CONTENT_TYPES[ext]

    async def sweep(self) -> int:
        """Delete images older than the link lifetime: nobody can fetch them any more."""
        return await self._backend.delete_older_than(self._clock() - self.ttl_s)

    async def aclose(self) -> None:
        await self._backend.aclose()


def _new_id(content_type: str) -> str:
    return f"{secrets.token_urlsafe(_ID_BYTES)}.{EXTENSIONS[content_type]}"


def load_or_create_secret(path: Path) -> bytes:
    """The URL-signing key: kept in the data dir so links survive a restart."""
    if path.exists():
        return path.read_bytes()
    private_dir(path.parent)
    secret = secrets.token_bytes(32)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with os.fdopen(create_private(tmp), "wb") as f:
            f.write(secret)
        # link() publishes the complete file or fails: two processes starting
        # together on a new data dir then agree on one secret.
        os.link(tmp, path)
    except FileExistsError:
        return path.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    return secret
