"""Issue 8's must-show for images: a URL signed by replica A is served by replica B.

Two `imagegate serve-grpc` processes share a database (one SQLite file, or a
PostgreSQL schema) and an S3 bucket on a real S3-compatible server (moto), each
behind its own aiohttp REST front.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service import keys
from tests.conftest import store_for
from tests.replicas import replicas
from tests.rest import call
from tests.s3_server import S3Bucket

BODY = {"model": "local", "prompt": "a shared harbour", "size": "256x256", "n": 2}


def replica_env(bucket: S3Bucket, secret: str) -> dict[str, str]:
    return {
        **bucket.env,
        "IMAGEGATE_IMAGE_STORE": bucket.url("replicated"),
        "IMAGEGATE_URL_SECRET": secret,
    }


async def test_a_url_signed_by_one_replica_is_served_by_the_other(
    database_url: str, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    store = store_for(database_url)
    await store.open(migrate=True)
    try:
        await store.create_account("shared", 1_000_000)
        key = keys.new_key()
        await store.create_key("shared", keys.hash_key(key), keys.display_prefix(key), "", None)
    finally:
        await store.close()
    env = replica_env(s3_bucket, secrets.token_hex(32))
    async with (
        replicas(database_url, tmp_path, 2, env=env) as pair,
        contextlib.AsyncExitStack() as stack,
    ):
        fronts = []
        for replica in pair:
            runner = await start_gateway(GatewayConfig(grpc_target=replica.grpc_target), port=0)
            stack.push_async_callback(runner.cleanup)
            fronts.append(f"http://127.0.0.1:{bound_port(runner)}")
        for made_by, served_by in ((0, 1), (1, 0)):
            reply = await call(
                "POST", f"{fronts[made_by]}/v1/images/generations", key=key, json_body=BODY
            )
            assert reply.status == 200, reply.body
            urls = [item["url"] for item in reply.json()["data"]]
            assert len(urls) == 2
            for url in urls:
                parts = urlsplit(url)
                # The link names the front that made it; the other replica gets it here.
                assert f"{parts.scheme}://{parts.netloc}" == fronts[made_by]
                link = f"{parts.path}?{parts.query}"
                mine = await call("GET", fronts[made_by] + link)
                other = await call("GET", fronts[served_by] + link)
                assert (other.status, other.headers["Content-Type"]) == (200, "image/png")
                assert other.body == mine.body and other.body.startswith(b"\x89PNG")
                # Only the signature opens it, on every replica.
                tampered = link.replace("signature=", "signature=0")
                assert (await call("GET", fronts[served_by] + tampered)).status == 404
    # The images are in the bucket, none in a replica's own folder.
    assert len(await s3_bucket.keys()) == 4
    assert all(key.startswith("replicated/") for key in await s3_bucket.keys())
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("replica*/images/*")))
