"""Images served by URL: files under the data dir, behind HMAC-signed expiring links."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from service.errors import ImageNotFound
from service.private import create_private, private_dir

ROUTE = "/v1/images/files/"
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
CONTENT_TYPES = {ext: ctype for ctype, ext in EXTENSIONS.items()}
# 24 random bytes, URL-safe: unguessable even without the signature.
_ID_BYTES = 24
NOT_FOUND = "No such image, or its link has expired or was altered."
# What put() and signed_path() make: URL-safe ids with an extension, ASCII
# decimal expiries, lowercase hex SHA-256 signatures.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}\.[a-z]{3,4}")
_EXPIRES_RE = re.compile(r"[0-9]{1,20}")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")


class ImageStore:
    def __init__(
        self, root: Path, secret: bytes, ttl_s: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._root = root
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    async def put(self, data: bytes, content_type: str) -> str:
        image_id = f"{secrets.token_urlsafe(_ID_BYTES)}.{EXTENSIONS[content_type]}"
        await asyncio.to_thread(self._write, image_id, data)
        return image_id

    async def put_all(self, images: Sequence[tuple[bytes, str]]) -> list[str]:
        """Store every image or none: if one write fails, those written are deleted."""
        results = await asyncio.gather(
            *(self.put(data, content_type) for data, content_type in images),
            return_exceptions=True,
        )
        ids = [r for r in results if isinstance(r, str)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await asyncio.to_thread(self._delete, ids)
            raise failures[0]
        return ids

    def _write(self, image_id: str, data: bytes) -> None:
        private_dir(self._root)
        tmp = self._root / f".{image_id}.tmp"
        fd = create_private(tmp)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            # Rename so a concurrent GET never sees a half-written file.
            tmp.replace(self._root / image_id)
        except BaseException:
            # A full disk leaves a partial file: delete it, which also frees the
            # space the database needs to give the reservation back.
            tmp.unlink(missing_ok=True)
            raise

    def _delete(self, image_ids: list[str]) -> None:
        for image_id in image_ids:
            (self._root / image_id).unlink(missing_ok=True)

    def signed_path(self, image_id: str) -> str:
        """The path and query of a link valid for ttl_s from now."""
        expires = str(int(self._clock()) + self.ttl_s)
        return f"{ROUTE}{image_id}?expires={expires}&signature={self._sign(image_id, expires)}"

    def _sign(self, image_id: str, expires: str) -> str:
        message = f"{image_id}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    async def get(self, image_id: str, expires: str, signature: str) -> tuple[bytes, str]:
        """The image bytes and MIME type, or ImageNotFound for any bad or stale link."""
        # Shapes first: only then are int() and compare_digest() safe (str.isdigit()
        # takes '²', int() refuses 5000 digits, compare_digest() non-ASCII text).
        valid = (
            _ID_RE.fullmatch(image_id) is not None
            and _EXPIRES_RE.fullmatch(expires) is not None
            and _SIGNATURE_RE.fullmatch(signature) is not None
            and int(expires) >= self._clock()
            and hmac.compare_digest(self._sign(image_id, expires), signature)
        )
        ext = image_id.rpartition(".")[2]
        if not valid or ext not in CONTENT_TYPES:
            raise ImageNotFound(NOT_FOUND)
        try:
            data = await asyncio.to_thread((self._root / image_id).read_bytes)
        except FileNotFoundError:
            raise ImageNotFound(NOT_FOUND) from None
        return data, CONTENT_TYPES[ext]

    async def sweep(self) -> int:
        """Delete images older than the link lifetime: nobody can fetch them any more."""
        return await asyncio.to_thread(self._sweep, self._clock() - self.ttl_s)

    def _sweep(self, cutoff: float) -> int:
        removed = 0
        if not self._root.is_dir():
            return 0
        for entry in os.scandir(self._root):
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed


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
