"""The data directory and all in it are private to the user running imagegate (0700 / 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
from imagegate.v1 import images_pb2, images_pb2_grpc

from service.server import start_service
from tests.conftest import make_tenant, service_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_everything_created_is_private_whatever_the_umask(tmp_path: Path) -> None:
    data = tmp_path / "new" / ".imagegate"
    previous = os.umask(0)  # the most permissive umask: modes must not rely on it
    try:
        service = await start_service(service_config(data), port=0)
        try:
            tenant = await make_tenant(service)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                reply = await images_pb2_grpc.ImageServiceStub(channel).GenerateImages(
                    images_pb2.GenerateImagesRequest(model="local", prompt="p", size="256x256"),
                    metadata=[("authorization", f"Bearer {tenant.key}")],
                )
            assert reply.data[0].url
            # While the database is open, its -wal and -shm files exist too.
            files = sorted(p.name for p in data.iterdir())
            assert files == [
                "imagegate.db",
                "imagegate.db-shm",
                "imagegate.db-wal",
                "images",
                "url_secret",
            ]
            modes = {p.relative_to(data).as_posix(): _mode(p) for p in data.rglob("*")}
            modes["."] = _mode(data)
        finally:
            await service.stop()
    finally:
        os.umask(previous)
    (image,) = [name for name in modes if name.startswith("images/")]
    assert modes == {
        ".": 0o700,
        "images": 0o700,
        image: 0o600,
        "imagegate.db": 0o600,
        "imagegate.db-shm": 0o600,
        "imagegate.db-wal": 0o600,
        "url_secret": 0o600,
    }
