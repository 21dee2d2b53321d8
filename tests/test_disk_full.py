"""A full disk while images are written: the request fails cleanly, frees its money and files."""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import grpc
import pytest
from imagegate.v1 import images_pb2, images_pb2_grpc

from service.imagestore import local
from tests.conftest import Stack, balance, make_tenant
from tests.rest import assert_error, call

BODY = {"model": "local", "prompt": "a full disk", "n": 3, "size": "1024x1024"}


class FullDisk:
    """The image store's `os`, with a disk that fills up: the first `room` files are
    written whole; later writes land half their bytes, then fail with ENOSPC."""

    def __init__(self, room: int) -> None:
        self._room = room
        self._files: set[int] = set()
        self._lock = threading.Lock()
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: memoryview) -> int:
        inode = os.fstat(fd).st_ino  # fd numbers are reused, a file's inode is not
        with self._lock:
            if inode not in self._files and len(self._files) < self._room:
                self._files.add(inode)
            full = inode not in self._files
        if not full:
            return os.write(fd, data)
        written = os.write(fd, data[: len(data) // 2])
        if written == 0 or len(data) == 1:
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return written


@pytest.fixture
def image_dir(stack: Stack) -> set[str]:
    """The images now in the service's folder."""
    root = stack.service.config.data_dir / "images"
    return set(os.listdir(root)) if root.is_dir() else set()


@pytest.mark.parametrize("room", [0, 1])
async def test_rest(
    base_url: str, stack: Stack, monkeypatch: pytest.MonkeyPatch, image_dir: set[str], room: int
) -> None:
    tenant = await make_tenant(stack.service)
    disk = FullDisk(room)
    monkeypatch.setattr(local, "os", disk)
    reply = await call("POST", f"{base_url}/v1/images/generations", key=tenant.key, json_body=BODY)
    assert_error(reply, 500, "server_error", None)
    assert disk.failed
    await _nothing_left(stack, tenant.account, image_dir)


async def test_grpc(
    grpc_stub: images_pb2_grpc.ImageServiceStub,
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
    image_dir: set[str],
) -> None:
    tenant = await make_tenant(stack.service)
    monkeypatch.setattr(local, "os", FullDisk(1))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await grpc_stub.GenerateImages(
            images_pb2.GenerateImagesRequest(**BODY),
            metadata=[("authorization", f"Bearer {tenant.key}")],
        )
    # Our own failure, not the caller's nor the upstream's: INTERNAL, saying nothing more.
    assert (raised.value.code(), raised.value.details()) == (
        grpc.StatusCode.INTERNAL,
        "internal error",
    )
    await _nothing_left(stack, tenant.account, image_dir)


async def _nothing_left(stack: Stack, account: str, before: set[str]) -> None:
    """Right after the answer: no partial or orphan file, the money all given back."""
    assert set(os.listdir(stack.service.config.data_dir / "images")) == before
    assert await balance(stack.service, account) == 1_000_000
    assert [u.status for u in await stack.service.store.usage(account)] == ["released"]
