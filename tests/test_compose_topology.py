"""docker-compose.yml's topology run for real on loopback, as far as it goes without Docker.

Compose's own commands and settings, with only the addresses moved: the
one-shot bucket creation (against moto, the S3-compatible server) and
`imagegate migrate` (against this test's PostgreSQL schema), two `serve-grpc`
replicas with the replicas' environment, and Envoy on the config compose
builds from envoy.yaml, its cluster's two endpoints pointed at the replicas.
Then: requests through Envoy spread over both replicas, and every image URL
works through Envoy and from either replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service import keys
from tests import compose, pg
from tests.conftest import FRONTS, store_for
from tests.envoy_harness import EnvoyFront
from tests.replicas import Replica, start_replica
from tests.rest import call
from tests.s3_server import MotoServer

pytestmark = pytest.mark.envoy
REQUESTS = 6
BODY = {"model": "local", "prompt": "a lighthouse, replicated", "size": "256x256"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _run(argv: list[str], env: dict[str, str]) -> str:
    """A compose one-shot's command, here; its output, or a failure with it."""
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode(errors="replace")
    return output.decode()


def _local(env: dict[str, str], postgres_url: str, s3: MotoServer) -> dict[str, str]:
    """A compose environment with compose's host names replaced by this machine's servers."""
    moved = dict(env)
    if "IMAGEGATE_DATABASE_URL" in moved:
        assert "@postgres:5432/" in moved["IMAGEGATE_DATABASE_URL"]
        moved["IMAGEGATE_DATABASE_URL"] = postgres_url
    if "AWS_ENDPOINT_URL" in moved:
        assert moved["AWS_ENDPOINT_URL"] == "http://minio:9000"
        moved["AWS_ENDPOINT_URL"] = s3.endpoint
    if "IMAGEGATE_REDIS_URL" in moved:
        moved["IMAGEGATE_REDIS_URL"] = "redis://127.0.0.1:6379/0"
    return moved


def _envoy_config(replicas: list[Replica], listener_port: int, console_port: int) -> dict[str, Any]:
    """Compose's Envoy config: its endpoints (imagegate-1, -2) at the replicas' ports,
    the console's at the console front's."""
    config = compose.envoy_config()
    [console] = compose.cluster_endpoints(config, "console")
    assert console["address"] == "console"
    console.update(address="127.0.0.1", port_value=console_port)
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    [listener] = config["static_resources"]["listeners"]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listener_port)
    endpoints = compose.cluster_endpoints(config)
    assert [e["address"] for e in endpoints] == list(compose.REPLICAS)
    for endpoint, replica in zip(endpoints, replicas, strict=True):
        endpoint.update(address="127.0.0.1", port_value=replica.port)
    return config


@contextlib.asynccontextmanager
async def _replicas(
    postgres_url: str, root: Path, env: dict[str, str]
) -> AsyncIterator[list[Replica]]:
    started = await asyncio.gather(
        *(start_replica(postgres_url, root / name, env=env) for name in compose.REPLICAS),
        return_exceptions=True,
    )
    running = [r for r in started if isinstance(r, Replica)]
    try:
        for result in started:
            if isinstance(result, BaseException):
                raise result
        yield running
    finally:
        for replica in running:
            await replica.stop()


@pytest.mark.skipif("envoy" not in FRONTS, reason="IMAGEGATE_TEST_FRONTS leaves Envoy out")
async def test_compose_topology_on_loopback(
    postgres_url: str, s3_server: MotoServer, tmp_path: Path
) -> None:
    services = compose.services()
    envoy_port = _free_port()
    host = {"IMAGEGATE_URL_SECRET": "loopback-" + "s" * 40}
    host["IMAGEGATE_PUBLIC_URL"] = public = f"http://127.0.0.1:{envoy_port}"
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(compose.REPO)}

    # The one-shots, with their own commands (the bucket's twice: a second `up` finds it).
    bucket_env = _local(compose.environment("create-bucket", host), postgres_url, s3_server)
    for _ in range(2):
        assert "ready" in await _run(
            [sys.executable, *services["create-bucket"]["command"][1:]], {**base, **bucket_env}
        )
    bucket = bucket_env["IMAGEGATE_IMAGE_STORE"].removeprefix("s3://").split("/")[0]
    migrate_env = _local(compose.environment("migrate", host), postgres_url, s3_server)
    migrate = services["migrate"]["command"]
    assert migrate[0] == "imagegate"
    await _run([sys.executable, "-m", "service.cli", *migrate[1:]], {**base, **migrate_env})

    store = store_for(postgres_url)
    await store.open()  # refuses an outdated schema: migrate did its work
    try:
        await store.create_account("acme", 1_000_000)
        key = keys.new_key()
        await store.create_key("acme", keys.hash_key(key), keys.display_prefix(key), "", None)
    finally:
        await store.close()
    before = await _bucket_keys(s3_server, bucket)

    env = _local(compose.environment("imagegate-1", host), postgres_url, s3_server)
    async with (
        _replicas(postgres_url, tmp_path, env) as replicas,
        contextlib.AsyncExitStack() as stack,
    ):
        # The `console` service: serve-rest to both replicas (compose names them by
        # one DNS name; here, by their two addresses).
        command = services["console"]["command"]
        assert command[:3] == ["imagegate", "serve-rest", "--grpc-target"]
        both = "ipv4:" + ",".join(r.grpc_target for r in replicas)
        console_front = await start_gateway(GatewayConfig(grpc_target=both), port=0)
        stack.push_async_callback(console_front.cleanup)
        envoy = await EnvoyFront.from_config(
            _envoy_config(replicas, envoy_port, bound_port(console_front))
        )
        stack.push_async_callback(envoy.stop)
        assert envoy.base_url == public
        fronts = []
        for replica in replicas:  # a front per replica, to fetch from each on purpose
            runner = await start_gateway(GatewayConfig(grpc_target=replica.grpc_target), port=0)
            stack.push_async_callback(runner.cleanup)
            fronts.append(f"http://127.0.0.1:{bound_port(runner)}")

        urls = []
        for _ in range(REQUESTS):
            reply = await call("POST", f"{public}/v1/images/generations", key=key, json_body=BODY)
            assert reply.status == 200, reply.body
            urls.append(reply.json()["data"][0]["url"])
        # Envoy spread them: both replicas reserved and settled some.
        conn = await pg.connect(postgres_url)
        try:
            owners = await conn.fetch(
                "SELECT owner, count(*) AS n FROM reservations WHERE status = 'settled' "
                "GROUP BY owner"
            )
        finally:
            await conn.close()
        assert len(owners) == 2 and sum(row["n"] for row in owners) == REQUESTS, owners

        for url in urls:
            # IMAGEGATE_PUBLIC_URL: every link points at Envoy, whoever signed it.
            assert url.startswith(f"{public}/v1/images/files/")
            link = url.removeprefix(public)
            bodies = set()
            for base_url in (public, public, *fronts):  # Envoy twice (round robin), each replica
                image = await call("GET", base_url + link)
                assert (image.status, image.headers["Content-Type"]) == (200, "image/png")
                bodies.add(image.body)
            assert len(bodies) == 1

        # The web console through Envoy, on the console's front: sign in, then the API.
        page = await call("GET", f"{public}/console/")
        assert page.status == 200 and "Content-Security-Policy" in page.headers
        console_header = {"X-Imagegate-Console": "1", "Origin": public}
        session = await call(
            "POST", f"{public}/console/session", json_body={"key": key}, headers=console_header
        )
        assert session.status == 200 and session.json()["role"] == "account"
        cookie = {"Cookie": session.headers["Set-Cookie"].split(";")[0]}
        balance = await call("GET", f"{public}/console/api/v1/balance", headers=cookie)
        assert balance.json()["balance_micros"] == str(1_000_000 - REQUESTS * 1000)
    assert len(await _bucket_keys(s3_server, bucket)) == len(before) + REQUESTS


async def _bucket_keys(s3: MotoServer, bucket: str) -> list[str]:
    def list_keys() -> list[str]:
        client = s3.client()
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            return [item["Key"] for page in pages for item in page.get("Contents", ())]
        finally:
            client.close()

    return await asyncio.to_thread(list_keys)
