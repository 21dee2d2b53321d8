"""The skeleton: imagegate's layout with all of imagegate's own work taken out.

N "services" (grpc.aio on uvloop, `ImageService.GenerateImages` only) and N "fronts"
(aiohttp on uvloop, `POST /v1/images/generations` only), each group sharing its port
(SO_REUSEPORT) as `imagegate serve --workers N` does; front i calls service i only
(imagegate's fronts call their own service too while they have one call at a time).
A front parses the JSON body, makes the request message and calls its service; a
service posts to the upstream, decodes the reply's base64 into the message and
answers; the front prints that as OpenAI's JSON.
No key, no billing, no validation, no logging, no metrics: what is left is what the
processes and their libraries cost. `make bench` (target f) and
`bench/profile_path.py --skeleton` measure it beside imagegate in one run, so the gap
between the two is imagegate's own work and the skeleton's overhead is the least a
gateway of this shape, in these libraries, could add.

    python bench/skeleton.py UPSTREAM_URL GRPC_PORT REST_PORT WORKERS

Each process prints `skeleton: service ready` or `skeleton: front ready` once it listens.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pybase64 as base64

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import grpc
import orjson
import uvloop
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegate.v1 import images_pb2, images_pb2_grpc

from bench.stack import free_port

# Large replies (4 images of ~1.5 MB) exceed gRPC's default 4 MiB.
LIMITS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class Service(images_pb2_grpc.ImageServiceServicer):
    def __init__(self, upstream_url: str) -> None:
        self.url = f"{upstream_url}/v1/images/generations"
        self.http = aiohttp.ClientSession()

    async def GenerateImages(
        self, request: images_pb2.GenerateImagesRequest, context: Any
    ) -> images_pb2.ImagesResponse:
        body = {"model": request.model, "prompt": request.prompt, "size": request.size}
        if request.HasField("n"):
            body["n"] = request.n
        async with self.http.post(self.url, json=body) as response:
            reply = orjson.loads(await response.read())
        data = [images_pb2.Image(b64_json=base64.b64decode(i["b64_json"])) for i in reply["data"]]
        return images_pb2.ImagesResponse(created=reply["created"], data=data)


class Health(health_pb2_grpc.HealthServicer):
    """SERVING, always: what Envoy's active health check asks before it routes a call."""

    async def Check(self, request: Any, context: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def serve_grpc(upstream_url: str, shared_port: int, own_port: int) -> None:
    server = grpc.aio.server(options=[*LIMITS, ("grpc.so_reuseport", 1)])
    images_pb2_grpc.add_ImageServiceServicer_to_server(Service(upstream_url), server)
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    server.add_insecure_port(f"127.0.0.1:{shared_port}")
    server.add_insecure_port(f"127.0.0.1:{own_port}")
    await server.start()
    print("skeleton: service ready", flush=True)
    await server.wait_for_termination()


async def serve_rest(rest_port: int, service_port: int) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service_port}", options=LIMITS)
    stub = images_pb2_grpc.ImageServiceStub(channel)

    async def generate(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        message = images_pb2.GenerateImagesRequest(
            prompt=body["prompt"],
            model=body.get("model", ""),
            size=body.get("size", ""),
            response_format=body.get("response_format", ""),
            n=body.get("n"),
        )
        auth = request.headers.get("Authorization", "")
        reply = await stub.GenerateImages(
            message, metadata=(("authorization", auth),), timeout=30, wait_for_ready=True
        )
        data = [{"b64_json": base64.b64encode(i.b64_json).decode()} for i in reply.data]
        text = orjson.dumps({"created": reply.created, "data": data})
        return web.Response(body=text, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/images/generations", generate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", rest_port, reuse_port=True).start()
    print("skeleton: front ready", flush=True)
    await asyncio.Event().wait()


def supervise(upstream_url: str, grpc_port: int, rest_port: int, workers: int) -> None:
    """Start the 2N processes; stop them when stopped (SIGTERM)."""
    me = [sys.executable, __file__]
    procs: list[subprocess.Popen[bytes]] = []
    for _ in range(workers):
        own = free_port()
        procs.append(subprocess.Popen([*me, "--grpc", upstream_url, str(grpc_port), str(own)]))
        procs.append(subprocess.Popen([*me, "--rest", str(rest_port), str(own)]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


if __name__ == "__main__":
    if sys.argv[1] == "--grpc":
        uvloop.run(serve_grpc(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    elif sys.argv[1] == "--rest":
        uvloop.run(serve_rest(int(sys.argv[2]), int(sys.argv[3])))
    else:
        supervise(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
