"""Both image backends, files and a real S3 server (moto), behind the same ImageStore:
signed links, all-or-nothing writes (on failure and on cancellation) and the sweep."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from service.config import Config
from service.errors import ImageNotFound
from service.images import ROUTE, ImageStore
from service.imagestore import open_backend
from service.imagestore.base import ImageBackend
from service.imagestore.local import LocalFiles
from service.imagestore.s3 import S3Objects, parse_url
from service.server import start_service
from tests.s3_server import MotoServer, S3Bucket

TTL = 3600
SECRET = b"a shared secret"
PNG, JPEG = b"\x89PNG\r\n\x1a\n png bytes", b"\xff\xd8\xff jpeg bytes"


@dataclass
class Backend:
    """A backend under test and a way to see what it holds, independent of it."""

    backend: ImageBackend
    kind: str
    bucket: S3Bucket | None = None
    root: Path | None = None

    async def names(self) -> list[str]:
        if self.bucket is not None:
            return await self.bucket.keys()
        assert self.root is not None
        return sorted(os.listdir(self.root)) if self.root.is_dir() else []


class Gate:
    """Holds writes inside their thread until opened; counts those finished."""

    def __init__(self, fail_write: int | None = None) -> None:
        self.opened = threading.Event()
        self.entered = threading.Semaphore(0)
        self.finished = threading.Semaphore(0)
        self.fail_write = fail_write
        self._count = 0
        self._lock = threading.Lock()

    def write(self, real: object, name: str, data: bytes, content_type: str) -> None:
        with self._lock:
            self._count += 1
            number = self._count
        self.entered.release()
        try:
            if number == self.fail_write:
                raise OSError("injected write failure")
            self.opened.wait(10)
            real(name, data, content_type)  # type: ignore[operator]
        finally:
            self.finished.release()


class GatedFiles(LocalFiles):
    gate: Gate

    def _write(self, name: str, data: bytes, content_type: str) -> None:
        self.gate.write(super()._write, name, data, content_type)


class GatedObjects(S3Objects):
    gate: Gate

    def _write(self, name: str, data: bytes, content_type: str) -> None:
        self.gate.write(super()._write, name, data, content_type)


@pytest.fixture(params=["files", "s3"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, s3_server: MotoServer
) -> AsyncIterator[Backend]:
    if request.param == "files":
        yield Backend(LocalFiles(tmp_path / "images"), "files", root=tmp_path / "images")
        return
    bucket = await s3_server.create_bucket()
    objects = await open_backend(bucket.url("gen/images"), tmp_path, bucket.env)
    assert isinstance(objects, S3Objects)
    yield Backend(objects, "s3", bucket=bucket)
    await objects.aclose()


def gated(backend: Backend, gate: Gate) -> ImageBackend:
    """The same backend, its writes passing through `gate` (in their thread)."""
    if isinstance(backend.backend, S3Objects):
        objects = GatedObjects(backend.backend._client, backend.backend.bucket, "gen/images/")
        objects.gate = gate
        return objects
    assert backend.root is not None
    files = GatedFiles(backend.root)
    files.gate = gate
    return files


def link_parts(path: str) -> tuple[str, str, str]:
    parts = urlsplit(path)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return parts.path.removeprefix(ROUTE), query["expires"], query["signature"]


async def test_put_get_and_links(backend: Backend) -> None:
    store = ImageStore(backend.backend, SECRET, TTL)
    ids = await store.put_all([(PNG, "image/png"), (JPEG, "image/jpeg")])
    prefix = "gen/images/" if backend.kind == "s3" else ""
    assert await backend.names() == sorted(prefix + i for i in ids)
    png_id, expires, signature = link_parts(store.signed_path(ids[0]))
    assert png_id == ids[0]
    assert await store.get(png_id, expires, signature) == (PNG, "image/png")
    assert await store.get(*link_parts(store.signed_path(ids[1]))) == (JPEG, "image/jpeg")
    # Another process with the same secret (a replica) serves the link; another secret not.
    assert await ImageStore(backend.backend, SECRET, TTL).get(png_id, expires, signature)
    with pytest.raises(ImageNotFound):
        await ImageStore(backend.backend, b"other", TTL).get(png_id, expires, signature)
    with pytest.raises(ImageNotFound):
        await store.get(ids[1], expires, signature)  # the signature is for another image
    # A signed link to an image that is gone: not found, from either backend.
    await backend.backend.delete([png_id])
    with pytest.raises(ImageNotFound):
        await store.get(png_id, expires, signature)
    assert await backend.names() == [prefix + ids[1]]


async def test_sweep_deletes_only_images_past_their_links(backend: Backend) -> None:
    store = ImageStore(backend.backend, SECRET, TTL)
    ids = await store.put_all([(PNG, "image/png")] * 3)
    others: list[str] = []
    if backend.bucket is not None:
        # Whatever else is in the bucket, under the prefix or not, is not ours to delete.
        others = ["gen/images/notes.txt", "gen/other.png", f"elsewhere/{ids[0]}"]
        for key in others:
            await backend.bucket.put(key, b"x")
    assert await store.sweep() == 0  # all fresh
    assert len(await backend.names()) == 3 + len(others)
    later = ImageStore(backend.backend, SECRET, TTL, clock=lambda: time.time() + TTL + 5)
    assert await later.sweep() == 3
    assert await backend.names() == sorted(others)


async def test_put_all_failure_leaves_nothing(backend: Backend) -> None:
    gate = Gate(fail_write=2)
    gate.opened.set()
    store = ImageStore(gated(backend, gate), SECRET, TTL)
    with pytest.raises(OSError, match="injected"):
        await store.put_all([(PNG, "image/png")] * 3)
    assert await backend.names() == []


async def test_put_all_cancelled_leaves_nothing(backend: Backend) -> None:
    gate = Gate()
    store = ImageStore(gated(backend, gate), SECRET, TTL)
    task = asyncio.create_task(store.put_all([(PNG, "image/png")] * 3))
    for _ in range(3):  # every write is inside its thread...
        assert await asyncio.to_thread(gate.entered.acquire, True, 10)
    task.cancel()  # ...when the request is cancelled (its client went away)
    await asyncio.sleep(0)
    gate.opened.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(3):  # the threads have finished writing
        assert await asyncio.to_thread(gate.finished.acquire, True, 10)
    assert await backend.names() == []


def test_s3_urls() -> None:
    assert parse_url("s3://bucket") == ("bucket", "")
    assert parse_url("s3://bucket/") == ("bucket", "")
    assert parse_url("s3://bucket/a/b/") == ("bucket", "a/b/")
    for bad in ("s3://", "s3:///prefix", "s3://bucket/p?x=1", "http://bucket/p"):
        with pytest.raises(ValueError, match="expected s3://BUCKET"):
            parse_url(bad)


async def test_s3_store_refuses_what_would_fail_later(
    s3_server: MotoServer, tmp_path: Path
) -> None:
    env = s3_server.env()
    with pytest.raises(ValueError, match="the bucket does not answer"):
        await open_backend("s3://no-such-bucket/x", tmp_path, env)
    without_keys = {k: v for k, v in env.items() if not k.startswith("AWS_SECRET")}
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY are not set"):
        await open_backend("s3://bucket/x", tmp_path, without_keys)
    with pytest.raises(ValueError, match="unsupported image store 'file'"):
        await open_backend("file:///tmp/x", tmp_path, env)


async def test_s3_store_needs_a_configured_url_secret(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """Each replica would make its own secret and refuse the links of the others."""
    config = Config(data_dir=tmp_path, image_store=s3_bucket.url())
    with pytest.raises(ValueError, match="set IMAGEGATE_URL_SECRET too"):
        await start_service(config, port=0, env=s3_bucket.env)
    assert not (tmp_path / "url_secret").exists()
    service = await start_service(
        Config(data_dir=tmp_path, image_store=s3_bucket.url(), url_secret="s" * 32),
        port=0,
        env=s3_bucket.env,
    )
    await service.stop()
    assert not (tmp_path / "images").exists()


def test_botocore_is_imported_only_for_an_s3_store(tmp_path: Path) -> None:
    script = f"""
import asyncio, sys
from pathlib import Path
import service.server
from service.imagestore import open_backend
asyncio.run(open_backend("", Path({str(tmp_path)!r}), {{}}))
assert "botocore" not in sys.modules, "botocore imported"
sys.modules["botocore"] = None  # as if not installed
try:
    asyncio.run(open_backend("s3://b/p", Path("."), {{}}))
except ValueError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "IMAGEGATE_IMAGE_STORE is s3://... but botocore is not installed "
        "(pip install 'imagegate[s3]')\n"
    )
