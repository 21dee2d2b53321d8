"""Kubernetes probes on the REST port: `/healthz` (this process answers) and `/readyz`
(the service answers its gRPC health check with SERVING, and no drain has started).

Both answer small JSON: 200 {"status":"ok"} / {"status":"ready"}, or 503
{"status":"unready"}. Envoy answers the same paths with the same bodies (envoy.yaml).
"""

from __future__ import annotations

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegate.v1 import images_pb2

from gateway.telemetry import LIFECYCLE

STUB: web.AppKey[health_pb2_grpc.HealthStub] = web.AppKey("health_stub")
SERVICE = images_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
# A probe must answer before Kubernetes' own timeout (1 s by default).
CHECK_TIMEOUT_S = 0.8
OK = b'{"status":"ok"}'
READY = b'{"status":"ready"}'
UNREADY = b'{"status":"unready"}'


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)


async def healthz(request: web.Request) -> web.Response:
    return _json(200, OK)


async def readyz(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining or not await _serving(request.app[STUB]):
        return _json(503, UNREADY)
    return _json(200, READY)


async def _serving(stub: health_pb2_grpc.HealthStub) -> bool:
    try:
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=CHECK_TIMEOUT_S
        )
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, headers={"Content-Type": "application/json"})
