"""A real S3-compatible server on loopback: moto's server mode, one process per test session.

`moto_server` (from `moto[server]`) runs as a subprocess on 127.0.0.1 and a free
port, and is stopped by its pid. Each test gets a bucket of its own; the AWS
variables a client needs to reach it are `S3Bucket.env`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 30.0
RUNNING = re.compile(rb"Running on (http://127\.0\.0\.1:\d+)")
REGION = "us-east-1"


@dataclass
class MotoServer:
    process: asyncio.subprocess.Process
    endpoint: str
    _drain: asyncio.Task[None]

    @classmethod
    async def start(cls) -> MotoServer:
        binary = Path(sys.executable).with_name("moto_server")
        process = await asyncio.create_subprocess_exec(
            str(binary),
            "-H",
            "127.0.0.1",
            "-p",
            "0",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert process.stdout
        output = b""
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while not (running := RUNNING.search(output)):
                    line = await process.stdout.readline()
                    assert line, f"moto_server exited early:\n{output.decode(errors='replace')}"
                    output += line
        except BaseException:
            process.kill()
            await process.wait()
            raise
        # It logs every request: keep reading so it never blocks on a full pipe.
        drain = asyncio.create_task(_drain(process.stdout))
        return cls(process, running[1].decode(), drain)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": REGION,
        }

    def client(self) -> Any:
        """A plain botocore client for the test's own checks (call it in a thread)."""
        import botocore.session

        env = self.env()
        return botocore.session.get_session().create_client(
            "s3",
            region_name=REGION,
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    async def create_bucket(self, name: str | None = None) -> S3Bucket:
        name = name or f"imagegate-test-{secrets.token_hex(6)}"
        client = self.client()
        try:
            await asyncio.to_thread(client.create_bucket, Bucket=name)
        finally:
            client.close()
        return S3Bucket(self, name)


async def _drain(stream: asyncio.StreamReader) -> None:
    with contextlib.suppress(Exception):
        while await stream.readline():
            pass


@dataclass
class S3Bucket:
    server: MotoServer
    name: str

    @property
    def env(self) -> dict[str, str]:
        return self.server.env()

    def url(self, prefix: str = "images") -> str:
        return f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"

    async def keys(self) -> list[str]:
        """Every object key in the bucket, sorted."""

        def list_all() -> list[str]:
            client = self.server.client()
            try:
                pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
                return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))
            finally:
                client.close()

        return await asyncio.to_thread(list_all)

    async def put(self, key: str, data: bytes) -> None:
        def put() -> None:
            client = self.server.client()
            try:
                client.put_object(Bucket=self.name, Key=key, Body=data)
            finally:
                client.close()

        await asyncio.to_thread(put)
