"""The Envoy front: envoy.yaml validates, docker-compose.yml runs it over two replicas,
and a running Envoy answers every error-table row exactly as gateway/errors.py says.

The gRPC side is a small in-test ImageService that fails on demand the way
service/grpc_errors.py does (rich status + imagegate-* trailing metadata), so
these tests pin Envoy's own behaviour; the REST contract suite runs the real
service behind both fronts.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
import pytest
import yaml
from google.api import httpbody_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from imagegate.v1 import images_pb2, images_pb2_grpc
from multidict import CIMultiDictProxy

from gateway import errors, json_text
from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service.config import Config
from tests import compose
from tests.conftest import FRONTS
from tests.envoy_harness import (
    ENVOY_YAML,
    LISTENER,
    REPO,
    EnvoyFront,
    _only,
    _routes,
    envoy_front,
    patched_config,
    validate,
)

pytestmark = pytest.mark.envoy

MiB = 1024 * 1024
Code = grpc.StatusCode
# The gRPC code the service uses for each reason of the table (DESIGN.md).
REASON_CODES: dict[str, Code] = {
    "INVALID_PARAMETER": Code.INVALID_ARGUMENT,
    "MODEL_NOT_SUPPORTED": Code.INVALID_ARGUMENT,
    "INVALID_BODY": Code.INVALID_ARGUMENT,
    "UPLOAD_TOO_LARGE": Code.INVALID_ARGUMENT,
    "CONTENT_POLICY": Code.INVALID_ARGUMENT,
    "INVALID_API_KEY": Code.UNAUTHENTICATED,
    "MODEL_NOT_ALLOWED": Code.PERMISSION_DENIED,
    "INSUFFICIENT_BALANCE": Code.FAILED_PRECONDITION,
    "IDEMPOTENCY_CONFLICT": Code.ALREADY_EXISTS,
    "RATE_LIMITED": Code.RESOURCE_EXHAUSTED,
    "UPSTREAM_ERROR": Code.UNAVAILABLE,
    "DEADLINE_EXCEEDED": Code.DEADLINE_EXCEEDED,
    "IMAGE_NOT_FOUND": Code.NOT_FOUND,
    "MODEL_NOT_FOUND": Code.NOT_FOUND,
    "ADMIN_REQUIRED": Code.PERMISSION_DENIED,
    "ACCOUNT_NOT_FOUND": Code.NOT_FOUND,
    "ACCOUNT_EXISTS": Code.ALREADY_EXISTS,
    "KEY_NOT_FOUND": Code.NOT_FOUND,
}
# Every JSON escape and odd character a message can hold.
NASTY = (
    'Bad "size" \\ é\n\t\r\b\f\x00\x01\x1f\x7f\x85 <b>&</b> \u00ad\u200b\u2028\u2029'
    "\ufeff\U000e0001 100% 😀"
)
GENERATE = "/v1/images/generations"
GRPC_PATH = "/imagegate.v1.ImageService/GenerateImages"


# --- the stub ImageService -------------------------------------------------


@dataclass
class Failure:
    code: Code
    message: str
    reason: str | None = None
    param: str | None = None
    param_code: str | None = None
    retry_after: int | None = None
    # False: a bare status, as service/grpc_errors.internal_status() sends.
    rich: bool = True
    # True: initial metadata first, so the status travels in trailers, not trailers-only.
    after_headers: bool = False


@dataclass
class Call:
    method: str
    request: Message
    metadata: dict[str, str]


@dataclass
class StubImageService(images_pb2_grpc.ImageServiceServicer):
    port: int = 0
    failure: Failure | None = None
    crash: bool = False
    delay_s: float = 0.0
    images: images_pb2.ImagesResponse = field(default_factory=images_pb2.ImagesResponse)
    calls: list[Call] = field(default_factory=list)

    def reset(self) -> None:
        self.failure, self.crash, self.delay_s, self.calls = None, False, 0.0, []
        self.images = images_pb2.ImagesResponse(
            created=4_000_000_000,
            data=[images_pb2.Image(b64_json=b"\x00\xff", revised_prompt='é<>&\u2028"\\')],
            # Some counters zero, some not: the printed key order must not depend on which.
            usage=images_pb2.Usage(
                completion_tokens=3,
                input_tokens_details=images_pb2.InputTokensDetails(image_tokens=2),
                output_tokens=3,
            ),
            size="1024x1024",
        )

    async def GenerateImages(self, request: Message, context: Any) -> Message:
        return await self._answer("GenerateImages", request, context, self.images)

    async def ListModels(self, request: Message, context: Any) -> Message:
        model = images_pb2.Model(id="local", object="model", created=1, owned_by="imagegate")
        return await self._answer(
            "ListModels", request, context, images_pb2.ModelList(object="list", data=[model])
        )

    async def GetModel(self, request: Message, context: Any) -> Message:
        model = images_pb2.Model(id="local", object="model", created=1, owned_by="imagegate")
        return await self._answer("GetModel", request, context, model)

    async def GetImage(self, request: Message, context: Any) -> Message:
        body = httpbody_pb2.HttpBody(content_type="image/png", data=b"\x89PNG\r\n\x1a\n" * 4)
        return await self._answer("GetImage", request, context, body)

    async def _answer(self, method: str, request: Message, context: Any, reply: Message) -> Message:
        self.calls.append(Call(method, request, dict(context.invocation_metadata())))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.crash:
            raise RuntimeError("stub bug <with> a detail that must not leak")
        if self.failure is not None:
            await abort(context, self.failure)
        return reply


async def abort(context: Any, failure: Failure) -> None:
    """What service/grpc_errors.py sends: rich status plus imagegate-* trailing metadata."""
    status = status_pb2.Status(code=failure.code.value[0], message=failure.message)
    trailers: list[tuple[str, str]] = []
    if failure.reason is not None:
        metadata = {}
        if failure.param:
            metadata["param"] = failure.param
        if failure.param_code:
            metadata["code"] = failure.param_code
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.ErrorInfo(
                reason=failure.reason, domain="imagegate", metadata=metadata
            )
        )
        status.details.append(detail)
        trailers.append(("imagegate-reason", failure.reason))
        trailers.extend((f"imagegate-{k}", v) for k, v in metadata.items())
    if failure.retry_after is not None:
        trailers.append(("retry-after", str(failure.retry_after)))
    if failure.rich:
        trailers[:0] = rpc_status.to_status(status).trailing_metadata
    if failure.after_headers:
        await context.send_initial_metadata(())
    await context.abort(failure.code, failure.message, tuple(trailers))


async def start_stub() -> tuple[grpc.aio.Server, StubImageService]:
    # Above the 64 MiB both sides use, so Envoy's own response limit shows.
    limit = 128 * MiB
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    stub = StubImageService()
    stub.reset()
    images_pb2_grpc.add_ImageServiceServicer_to_server(stub, server)
    stub.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, stub


@dataclass
class Front:
    url: str
    stub: StubImageService


@pytest.fixture(scope="module")
async def fronts_and_stub() -> AsyncIterator[dict[str, Front]]:
    """Both fronts over one stub service, so each behaviour is checked on both."""
    server, stub = await start_stub()
    runner = await start_gateway(GatewayConfig(grpc_target=f"127.0.0.1:{stub.port}"), port=0)
    try:
        async with envoy_front(stub.port) as url:
            yield {
                "envoy": Front(url, stub),
                "aiohttp": Front(f"http://127.0.0.1:{bound_port(runner)}", stub),
            }
    finally:
        await runner.cleanup()
        await server.stop(None)


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest, fronts_and_stub: dict[str, Front]) -> Front:
    chosen = fronts_and_stub[request.param]
    chosen.stub.reset()
    return chosen


# --- HTTP helpers ------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


async def fetch(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    json_body: object = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    if json_body is not None:
        body = json.dumps(json_body).encode()
    data = io.BytesIO(body) if body is not None else None
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.request(method, url, data=data, headers=headers or {}) as response,
    ):
        return Reply(response.status, response.headers, await response.read())


def assert_clean(reply: Reply) -> None:
    """No gRPC plumbing leaks; every answer carries a request id."""
    leaked = [h for h in reply.headers if h.lower().startswith(("grpc-", "imagegate-", "x-envoy-"))]
    assert not leaked, leaked
    assert reply.headers.get("x-request-id")


def assert_row(
    reply: Reply,
    row: errors.Row,
    message: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> None:
    assert (reply.status, reply.body) == (row.status, errors.error_body(row, message, param, code))
    assert reply.headers["Content-Type"] == "application/json"
    assert_clean(reply)


# --- the committed files -------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def addresses(config: dict[str, Any]) -> dict[str, tuple[str, int]]:
    resources = config["static_resources"]
    [listener] = resources["listeners"]
    assert [c["name"] for c in resources["clusters"]] == ["imagegate", "console"]

    def pair(address: dict[str, Any]) -> tuple[str, int]:
        return address["socket_address"]["address"], address["socket_address"]["port_value"]

    def endpoint(name: str) -> tuple[str, int]:
        [locality] = _only(resources["clusters"], name)["load_assignment"]["endpoints"]
        [one] = locality["lb_endpoints"]
        return pair(one["endpoint"]["address"])

    return {
        "listener": pair(listener["address"]),
        "admin": pair(config["admin"]["address"]),
        "cluster": endpoint("imagegate"),
        "console": endpoint("console"),
    }


def transcoder(config: dict[str, Any]) -> dict[str, Any]:
    [listener] = config["static_resources"]["listeners"]
    [hcm] = listener["filter_chains"][0]["filters"]
    filters = hcm["typed_config"]["http_filters"]
    assert [f["name"].rsplit(".", 1)[-1] for f in filters] == [
        "lua",
        "health_check",
        "grpc_json_transcoder",
        "router",
    ]
    typed: dict[str, Any] = filters[2]["typed_config"]
    return typed


def test_committed_envoy_yaml_validates() -> None:
    result = validate()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_committed_addresses_and_limits() -> None:
    config = load(ENVOY_YAML)
    assert addresses(config) == {
        "listener": ("127.0.0.1", 10000),
        "admin": ("127.0.0.1", 9901),
        "cluster": ("127.0.0.1", Config().grpc_port),
        "console": ("127.0.0.1", GatewayConfig().rest_port),
    }
    t = transcoder(config)
    descriptor = Path(t["proto_descriptor"])
    assert not descriptor.is_absolute() and (REPO / descriptor).is_file()
    assert t["services"] == ["imagegate.v1.ImageService", "imagegate.v1.AdminService"]
    assert t["max_request_body_size"] == GatewayConfig().max_body_bytes == MiB
    assert t["max_response_body_size"] >= GatewayConfig().max_message_bytes
    text = ENVOY_YAML.read_text()
    assert "timeout: 300s" in text and "idle_timeout: 300s" in text
    assert "stream_idle_timeout: 300s" in text
    # Reading requests: the aiohttp front's settings, in Envoy's terms.
    front = GatewayConfig()
    hcm = _hcm(config)
    assert hcm["request_headers_timeout"] == f"{front.header_timeout_s:g}s"
    assert hcm["request_timeout"] == f"{front.header_timeout_s + front.body_timeout_s:g}s"
    assert hcm["common_http_protocol_options"]["idle_timeout"] == f"{front.header_timeout_s:g}s"
    assert hcm["max_request_headers_kb"] * 1024 == front.max_header_bytes
    assert hcm["http_protocol_options"] == {"accept_http_10": True}


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    [listener] = config["static_resources"]["listeners"]
    [hcm] = listener["filter_chains"][0]["filters"]
    typed: dict[str, Any] = hcm["typed_config"]
    return typed


# Every row of the table: the module's named rows and the reasons'.
ROWS = [
    *(row for row in vars(errors).values() if isinstance(row, errors.Row)),
    *errors.BY_REASON.values(),
]


def test_local_replies_are_rows_of_the_table() -> None:
    bodies = {errors.error_body(row): row for row in ROWS}
    mappers = _hcm(load(ENVOY_YAML))["local_reply_config"]["mappers"]
    seen = set()
    for mapper in mappers:
        body = mapper["body_format_override"]["text_format_source"]["inline_string"].encode()
        if body.startswith(b'{"status":'):
            continue  # /readyz's answers (gateway/health.py), not errors
        row = bodies.get(body)
        assert row is not None, body
        assert mapper.get("status_code", row.status) == row.status, body
        seen.add(row.code)
    # Every row Envoy itself may have to write (the others come from the service or Lua).
    assert {"malformed_request", "request_headers_too_large", "request_timeout"} <= seen
    assert {"invalid_json", "request_too_large", "service_unavailable", "timeout", None} <= seen


def _lua() -> str:
    filters = _hcm(load(ENVOY_YAML))["http_filters"]
    source: str = filters[0]["typed_config"]["default_source_code"]["inline_string"]
    return source


def test_lua_routes_are_the_aiohttp_routes() -> None:
    from gateway.app import ROUTES

    block = re.search(r"local ROUTES = \{(.*?)\n {0,}\}", _lua(), re.S)
    assert block
    lua = re.findall(r'\{"([^"]+)", "([A-Z]+)"', block.group(1))
    # Lua escapes '.' as '%.', Python as '\.'.
    assert [(pattern.replace("%.", "\\."), method) for pattern, method in lua] == list(ROUTES)


def test_openapi_is_served_from_the_same_file() -> None:
    [route] = [
        r
        for r in _routes(_only(load(ENVOY_YAML)["static_resources"]["listeners"], LISTENER))
        if "direct_response" in r
    ]
    assert route["match"] == {"path": "/openapi.json"}
    assert (
        REPO / route["direct_response"]["body"]["filename"]
    ) == REPO / "gateway" / "openapi.json"


def test_harness_moves_only_addresses() -> None:
    original = load(ENVOY_YAML)
    patched = patched_config(12345, rest_port=23456)
    assert addresses(patched) == {
        "listener": ("127.0.0.1", 0),
        "admin": ("127.0.0.1", 0),
        "cluster": ("127.0.0.1", 12345),
        "console": ("127.0.0.1", 23456),
    }
    for config in (original, patched):
        for address in (
            config["admin"]["address"],
            config["static_resources"]["listeners"][0]["address"],
        ):
            address["socket_address"]["port_value"] = None
        for cluster in config["static_resources"]["clusters"]:
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
                "socket_address"
            ]["port_value"] = None
    assert patched == original


# --- docker-compose.yml (tests/compose.py reads it as compose does) -------------------

DOCKERFILE = REPO / "Dockerfile"
# Compose waits for these before it starts what depends on them.
HEALTHY, DONE = "service_healthy", "service_completed_successfully"


def test_compose_references_files_that_exist() -> None:
    services = compose.services()
    for name in compose.OWN_IMAGE:
        # One image, built from the Dockerfile, for every imagegate container.
        assert services[name]["image"] == "imagegate:local", name
        assert (REPO / services[name]["build"] / "Dockerfile").is_file()
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
    envoy = services["envoy"]
    workdir = Path(envoy["working_dir"])
    mounts = {}
    for volume in envoy["volumes"]:
        source, target, mode = volume.split(":")
        assert mode == "ro"
        assert (REPO / source).is_file(), source
        mounts[Path(target)] = (REPO / source).resolve()
    # envoy.yaml and the descriptor sit under the working directory exactly as in the repo.
    assert mounts[workdir / "envoy.yaml"] == ENVOY_YAML
    descriptor = transcoder(load(ENVOY_YAML))["proto_descriptor"]
    assert mounts[workdir / descriptor] == (REPO / descriptor).resolve()
    # And every file a route answers with (the OpenAPI document).
    listener = _only(load(ENVOY_YAML)["static_resources"]["listeners"], LISTENER)
    for route in _routes(listener):
        if "direct_response" in route:
            served = route["direct_response"]["body"]["filename"]
            assert mounts[workdir / served] == (REPO / served).resolve()
    assert "envoy.yaml" in envoy["command"][-1]
    dockerfile = DOCKERFILE.read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    # The image has the drivers compose uses: PostgreSQL, and botocore for S3.
    [install] = re.findall(r"pip install '\.\[([\w,]+)\]'", dockerfile)
    assert {"postgres", "s3"} <= set(install.split(","))


def test_compose_starts_each_service_after_what_it_needs() -> None:
    services = compose.services()
    assert set(services) == {
        "postgres",
        "redis",
        "minio",
        "create-bucket",
        "migrate",
        *compose.REPLICAS,
        "console",
        "envoy",
    }
    for name in compose.REPLICAS:
        assert services[name]["depends_on"] == {
            "migrate": {"condition": DONE},
            "create-bucket": {"condition": DONE},
            "postgres": {"condition": HEALTHY},
            "redis": {"condition": HEALTHY},
            "minio": {"condition": HEALTHY},
        }
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": HEALTHY}}
    assert services["migrate"]["command"] == ["imagegate", "migrate"]
    assert services["create-bucket"]["depends_on"] == {"minio": {"condition": HEALTHY}}
    replicas_up = {r: {"condition": HEALTHY} for r in compose.REPLICAS}
    assert services["console"]["depends_on"] == replicas_up
    assert services["envoy"]["depends_on"] == {**replicas_up, "console": {"condition": HEALTHY}}
    # The console's front reaches both replicas by the name they share.
    assert services["console"]["command"] == [
        "imagegate",
        "serve-rest",
        "--grpc-target",
        "dns:///imagegate-grpc:50051",
    ]
    for name in compose.REPLICAS:
        assert services[name]["networks"] == {"default": {"aliases": ["imagegate-grpc"]}}
    assert "8080/readyz" in " ".join(services["console"]["healthcheck"]["test"])
    for name, service in services.items():
        for needed, how in service.get("depends_on", {}).items():
            if how["condition"] == HEALTHY:
                assert services[needed]["healthcheck"]["test"], needed
            else:  # a one-shot: runs once, is never restarted
                assert how["condition"] == DONE
                assert services[needed]["restart"] == "no" and "healthcheck" not in services[needed]
        if name not in ("migrate", "create-bucket"):
            assert service["restart"] == "unless-stopped", name
    for name in compose.REPLICAS:
        assert services[name]["command"][:2] == ["imagegate", "serve-grpc"]


def test_compose_replicas_share_one_ledger_one_bucket_one_secret() -> None:
    host = {"IMAGEGATE_URL_SECRET": "s" * 64}
    first, second = (compose.environment(name, host) for name in compose.REPLICAS)
    assert first == second
    services = compose.services()
    postgres = services["postgres"]["environment"]
    database = urlsplit(first["IMAGEGATE_DATABASE_URL"])
    assert (database.scheme, database.hostname, database.port) == ("postgresql", "postgres", 5432)
    assert (database.username, database.password, database.path) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        "/" + postgres["POSTGRES_DB"],
    )
    assert compose.environment("migrate", {}) == {
        "IMAGEGATE_DATABASE_URL": first["IMAGEGATE_DATABASE_URL"]
    }
    # The S3 client: the standard AWS variables, MinIO's root user as credentials.
    minio = services["minio"]["environment"]
    assert first["IMAGEGATE_IMAGE_STORE"].startswith("s3://")
    assert first["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert (first["AWS_ACCESS_KEY_ID"], first["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    s3 = {k: v for k, v in first.items() if k.startswith("AWS_") or k == "IMAGEGATE_IMAGE_STORE"}
    assert compose.environment("create-bucket", {}) == s3
    assert first["IMAGEGATE_REDIS_URL"] == "redis://redis:6379/0"
    # Without a signing key compose refuses to start (a replica would refuse too).
    assert first["IMAGEGATE_URL_SECRET"] == host["IMAGEGATE_URL_SECRET"]
    with pytest.raises(compose.MissingVariable, match="IMAGEGATE_URL_SECRET"):
        compose.environment("imagegate-1", {})
    # Image links point at Envoy's published port, whichever replica signed them.
    assert first["IMAGEGATE_PUBLIC_URL"] == "http://127.0.0.1:10000"
    assert (
        compose.environment("imagegate-1", {**host, "IMAGEGATE_PUBLIC_URL": "https://x.example"})[
            "IMAGEGATE_PUBLIC_URL"
        ]
        == "https://x.example"
    )
    # Every IMAGEGATE_* variable set is one imagegate reads. IMAGEGATE_REDIS_URL is
    # read by the per-key limits (branch `limits`, not yet on main when this was written).
    known = {f"IMAGEGATE_{n.upper()}" for n in (*Config().__dict__, *GatewayConfig().__dict__)}
    known.add("IMAGEGATE_REDIS_URL")
    dockerfile = dict(re.findall(r"(IMAGEGATE_\w+)=(\S+)", DOCKERFILE.read_text()))
    settings = {k for k in first if k.startswith("IMAGEGATE_")} | set(dockerfile)
    assert settings <= known, settings - known
    assert dockerfile["IMAGEGATE_HOST"] == "0.0.0.0"


def test_compose_ports_match_configs() -> None:
    services = compose.services()
    grpc_port, listener = Config().grpc_port, addresses(load(ENVOY_YAML))["listener"]
    assert (grpc_port, listener) == (50051, ("127.0.0.1", 10000))
    # Only Envoy is published, on the host's loopback; the rest talk on compose's network.
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published == {"envoy": ["127.0.0.1:10000:10000"]}
    assert compose.cluster_endpoints(compose.envoy_config()) == [
        {"address": name, "port_value": grpc_port} for name in compose.REPLICAS
    ]
    assert compose.cluster_endpoints(compose.envoy_config(), "console") == [
        {"address": "console", "port_value": GatewayConfig().rest_port}
    ]
    for name in compose.REPLICAS:
        assert f"127.0.0.1:{grpc_port}" in " ".join(services[name]["healthcheck"]["test"])
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^EXPOSE .*\b50051\b", dockerfile, re.M)
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)


def test_compose_envoy_config_is_envoy_yaml_with_both_replicas(tmp_path: Path) -> None:
    envoy = compose.services()["envoy"]
    assert 'sed -e "$$ENVOY_REWRITE" envoy.yaml' in envoy["command"][-1]
    text = subprocess.run(
        ["sed", "-e", compose.envoy_rewrite(), "envoy.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config_path = tmp_path / "envoy.yaml"
    config_path.write_text(text)
    result = validate(config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    config, original = load(config_path), load(ENVOY_YAML)
    [listener] = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 10000}
    assert config["admin"]["address"] == original["admin"]["address"]  # private to Envoy
    cluster = _only(config["static_resources"]["clusters"], "imagegate")
    # Found by name through compose's DNS; round robin over both (Envoy's default).
    assert cluster["type"] == "STRICT_DNS" and "lb_policy" not in cluster
    # The console's cluster: compose's `console` service, the aiohttp front.
    console = _only(config["static_resources"]["clusters"], "console")
    [locality] = console["load_assignment"]["endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]] == [
        {"address": "console", "port_value": GatewayConfig().rest_port}
    ]
    # Nothing else differs from what `make envoy` and the tests run.
    [listener["address"], original["static_resources"]["listeners"][0]["address"]] = [{}, {}]
    for c in (*config["static_resources"]["clusters"], *original["static_resources"]["clusters"]):
        c.pop("type")
        c["load_assignment"]["endpoints"] = []
    assert config == original


async def test_compose_healthcheck_probes_image_service() -> None:
    probe = compose.services()["imagegate-1"]["healthcheck"]["test"]
    assert probe[:3] == ["CMD", "python", "-c"]
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    code = probe[3].replace("127.0.0.1:50051", f"127.0.0.1:{port}")

    async def run() -> int:
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        return await process.wait()

    try:
        await servicer.set("imagegate.v1.ImageService", health_pb2.HealthCheckResponse.SERVING)
        assert await run() == 0
        await servicer.set("imagegate.v1.ImageService", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await run() != 0
    finally:
        await server.stop(None)


# --- a running Envoy: success responses -----------------------------------------------


async def test_success_prints_proto_json(front: Front) -> None:
    reply = await fetch(
        "POST",
        front.url + GENERATE,
        json_body={"prompt": "a cat"},
        headers={"Authorization": "Bearer sk-test"},
    )
    # Measured: uint32 is a JSON number, bytes are padded standard base64, zero
    # usage counters print, unset optionals do not, '<' '>' and U+2028 are escaped,
    # keys come in field order whichever fields are set.
    assert reply.body == (
        b'{"created":4000000000,"data":[{"b64_json":"AP8=","revised_prompt":"\xc3\xa9'
        b'\\u003c\\u003e&\\u2028\\"\\\\"}],"usage":{"prompt_tokens":0,"completion_tokens":3,'
        b'"total_tokens":0,"input_tokens":0,"input_tokens_details":{"text_tokens":0,'
        b'"image_tokens":2},"output_tokens":3},"size":"1024x1024"}'
    )
    assert (reply.status, reply.headers["Content-Type"]) == (200, "application/json")
    assert_clean(reply)
    [call] = front.stub.calls
    assert call.request == images_pb2.GenerateImagesRequest(prompt="a cat")
    assert call.metadata["authorization"] == "Bearer sk-test"


async def test_string_escaping_of_the_transcoder(front: Front) -> None:
    code_points = [cp for cp in range(0x10000) if not 0xD800 <= cp < 0xE000]
    code_points += [*range(0x1D100, 0x1D200), *range(0x1F600, 0x1F650), *range(0xE0000, 0xE0100)]
    front.stub.images = images_pb2.ImagesResponse(
        data=[images_pb2.Image(revised_prompt=chr(cp)) for cp in code_points]
    )
    reply = await fetch("POST", front.url + GENERATE, json_body={"prompt": "x"})
    printed = re.findall(rb'"revised_prompt":("(?:[^"\\]|\\.)*")', reply.body)
    assert len(printed) == len(code_points)
    # gateway/json_text.py must print every character as the transcoder does.
    wrong = [
        hex(cp)
        for cp, token in zip(code_points, printed, strict=True)
        if token != json_text.dumps(chr(cp))
    ]
    assert not wrong


async def test_bytes_print_as_standard_padded_base64(front: Front) -> None:
    raw = bytes(range(256)) * 3 + b"\xfb\xff"
    front.stub.images = images_pb2.ImagesResponse(data=[images_pb2.Image(b64_json=raw)])
    reply = await fetch("POST", front.url + GENERATE, json_body={"prompt": "x"})
    assert json.loads(reply.body)["data"] == [{"b64_json": base64.b64encode(raw).decode()}]


async def test_models_and_image_routes(front: Front) -> None:
    reply = await fetch("GET", front.url + "/v1/models?limit=5")
    assert json.loads(reply.body) == {
        "object": "list",
        "data": [{"id": "local", "object": "model", "created": 1, "owned_by": "imagegate"}],
    }
    reply = await fetch("GET", front.url + "/v1/models/local?x=1")
    assert (reply.status, reply.body) == (
        200,
        b'{"id":"local","object":"model","created":1,"owned_by":"imagegate"}',
    )
    assert front.stub.calls[-1].request == images_pb2.GetModelRequest(model="local")
    # Query values: '+' is a space, %2B a plus, and a repeated parameter's LAST value wins.
    reply = await fetch(
        "GET",
        front.url + "/v1/images/files/img1?expires=1+2&signature=a%2Bb"
        "&signature=last&other=ignored",
    )
    assert (reply.status, reply.headers["Content-Type"]) == (200, "image/png")
    assert reply.body == b"\x89PNG\r\n\x1a\n" * 4
    assert_clean(reply)
    assert front.stub.calls[-1].request == images_pb2.GetImageRequest(
        image_id="img1", expires="1 2", signature="last"
    )


async def test_get_bodies_are_ignored(front: Front) -> None:
    # As in the aiohttp front; the transcoder alone would parse them into the request.
    reply = await fetch("GET", front.url + "/v1/models", body=b"not json {")
    assert reply.status == 200
    reply = await fetch(
        "GET",
        front.url + "/v1/images/files/img1?signature=s",
        body=b'{"image_id":"other","expires":"9"}',
    )
    assert reply.status == 200
    assert front.stub.calls[-1].request == images_pb2.GetImageRequest(
        image_id="img1", signature="s"
    )


async def test_large_responses_arrive_intact(front: Front) -> None:
    for n, size in ((4, 1_500_000), (10, 5_000_000)):
        images = [bytes([i]) * size for i in range(n)]
        front.stub.images = images_pb2.ImagesResponse(
            data=[images_pb2.Image(b64_json=image) for image in images]
        )
        reply = await fetch("POST", front.url + GENERATE, json_body={"prompt": "x", "n": n})
        assert reply.status == 200, reply.body[:300]
        data = json.loads(reply.body)["data"]
        assert [base64.b64decode(item["b64_json"]) for item in data] == images


async def test_large_replies_are_byte_identical(fronts_and_stub: dict[str, Front]) -> None:
    # The aiohttp front writes b64_json in slices (gateway/response_json.py):
    # sizes around a slice boundary, empty images and odd text must still print
    # exactly as the transcoder prints the whole message.
    if "envoy" not in FRONTS:
        pytest.skip("IMAGEGATE_TEST_FRONTS excludes envoy")
    slice_ = 3 * 128 * 1024
    sizes = [0, 1, 2, slice_ - 1, slice_, slice_ + 1, 3 * slice_ + 2]
    stub = fronts_and_stub["envoy"].stub
    stub.reset()
    stub.images = images_pb2.ImagesResponse(
        created=7,
        data=[
            images_pb2.Image(
                b64_json=bytes((i * 7 + j) % 256 for j in range(size)), revised_prompt=NASTY
            )
            for i, size in enumerate(sizes)
        ]
        + [images_pb2.Image(url='http://x/"b64_json":""', revised_prompt='"b64_json":""')],
        usage=images_pb2.Usage(),
        size="1024x1024",
    )
    bodies = [
        (await fetch("POST", front.url + GENERATE, json_body={"prompt": "x"})).body
        for front in fronts_and_stub.values()
    ]
    assert bodies[0] == bodies[1]
    data = json.loads(bodies[0])["data"]
    assert [len(base64.b64decode(item.get("b64_json", ""))) for item in data] == [*sizes, 0]


async def test_response_over_the_limit_is_internal_error(front: Front) -> None:
    front.stub.images = images_pb2.ImagesResponse(
        data=[images_pb2.Image(b64_json=b"x" * 35 * MiB) for _ in range(2)]
    )
    assert_row(
        await fetch("POST", front.url + GENERATE, json_body={"prompt": "x"}), errors.INTERNAL
    )


# --- a running Envoy: errors from the service ---------------------------------------


@pytest.mark.parametrize("reason", sorted(errors.BY_REASON))
@pytest.mark.parametrize("after_headers", [False, True], ids=["trailers-only", "trailers"])
async def test_reason_rows(front: Front, reason: str, after_headers: bool) -> None:
    retry = 7 if reason == "RATE_LIMITED" else None
    front.stub.failure = Failure(
        REASON_CODES[reason],
        NASTY,
        reason,
        param="model",
        retry_after=retry,
        after_headers=after_headers,
    )
    reply = await fetch("POST", front.url + GENERATE, json_body={"prompt": "x"})
    assert_row(reply, errors.BY_REASON[reason], NASTY, "model")
    assert reply.headers.get("Retry-After") == (str(retry) if retry else None)


async def test_parameter_code_and_absent_param(front: Front) -> None:
    front.stub.failure = Failure(
        Code.INVALID_ARGUMENT,
        "prompt is required",
        "INVALID_PARAMETER",
        param="prompt",
        param_code="missing_required_parameter",
    )
    reply = await fetch("POST", front.url + GENERATE, json_body={})
    assert_row(
        reply,
        errors.BY_REASON["INVALID_PARAMETER"],
        "prompt is required",
        "prompt",
        "missing_required_parameter",
    )
    front.stub.failure = Failure(Code.ABORTED, "in flight", "IDEMPOTENCY_CONFLICT")
    reply = await fetch("POST", front.url + GENERATE, json_body={"prompt": "x"})
    assert_row(reply, errors.BY_REASON["IDEMPOTENCY_CONFLICT"], "in flight")


async def test_model_not_found_on_the_model_route(front: Front) -> None:
    front.stub.failure = Failure(Code.NOT_FOUND, "No such model.", "MODEL_NOT_FOUND")
    reply = await fetch("GET", front.url + "/v1/models/nope")
    assert_row(reply, errors.BY_REASON["MODEL_NOT_FOUND"], "No such model.")


async def test_image_not_found_on_the_image_route(front: Front) -> None:
    front.stub.failure = Failure(Code.NOT_FOUND, "No such image.", "IMAGE_NOT_FOUND")
    reply = await fetch("GET", front.url + "/v1/images/files/nope?expires=1&signature=x")
    assert_row(reply, errors.BY_REASON["IMAGE_NOT_FOUND"], "No such image.")


@pytest.mark.parametrize(
    ("failure", "row"),
    [
        (Failure(Code.DEADLINE_EXCEEDED, "deadline"), errors.DEADLINE),
        (Failure(Code.UNAVAILABLE, "connection reset <secret>"), errors.UNAVAILABLE),
        (Failure(Code.INTERNAL, "internal error", rich=False), errors.INTERNAL),
        (Failure(Code.FAILED_PRECONDITION, "no reason given"), errors.INTERNAL),
        (Failure(Code.RESOURCE_EXHAUSTED, "grpc message too large", rich=False), errors.INTERNAL),
        (Failure(Code.DEADLINE_EXCEEDED, "deadline", after_headers=True), errors.DEADLINE),
    ],
    ids=["deadline", "unavailable", "internal", "no-reason", "exhausted", "deadline-trailers"],
)
async def test_rows_without_reason(front: Front, failure: Failure, row: errors.Row) -> None:
    front.stub.failure = failure
    assert_row(await fetch("POST", front.url + GENERATE, json_body={"prompt": "x"}), row)


async def test_unknown_reason_and_crash_are_internal(front: Front) -> None:
    front.stub.failure = Failure(
        Code.INVALID_ARGUMENT, "secret", "NEW_REASON", param="size", retry_after=3
    )
    reply = await fetch("POST", front.url + GENERATE, json_body={"prompt": "x"})
    # As the aiohttp front: the INTERNAL row, its fixed message, the ErrorInfo's param.
    assert_row(reply, errors.INTERNAL, None, "size")
    assert reply.headers["Retry-After"] == "3"
    front.stub.failure, front.stub.crash = None, True
    assert_row(
        await fetch("POST", front.url + GENERATE, json_body={"prompt": "x"}), errors.INTERNAL
    )


# --- a running Envoy: errors of the front itself -----------------------------------


@pytest.mark.parametrize(
    ("method", "target", "path"),
    [
        ("GET", "/v1/nothing?key=secret", "/v1/nothing"),
        ("POST", "/v1/images/edit", "/v1/images/edit"),
        ("GET", "/v1/models/", "/v1/models/"),
        ("GET", "/v1/models/a/b", "/v1/models/a/b"),
        ("GET", "/v1/images/files/", "/v1/images/files/"),
        ("GET", "/v1/images/files/a/b", "/v1/images/files/a/b"),
        ("POST", GRPC_PATH, GRPC_PATH),  # native gRPC is not served on the REST port
        ("GET", "/", "/"),
    ],
)
async def test_unknown_url(front: Front, method: str, target: str, path: str) -> None:
    reply = await fetch(method, front.url + target)
    assert_row(reply, errors.UNKNOWN_URL, errors.unknown_url_message(method, path))
    assert not front.stub.calls


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/v1/models", "GET"),
        ("POST", "/v1/models/local", "GET"),
        ("GET", GENERATE, "POST"),
        ("PUT", GENERATE, "POST"),
        ("DELETE", "/v1/images/files/abc", "GET"),
        ("HEAD", "/v1/models", "GET"),
    ],
)
async def test_wrong_method(front: Front, method: str, path: str, allow: str) -> None:
    reply = await fetch(method, front.url + path + "?x=1")
    assert (reply.status, reply.headers["Allow"]) == (405, allow)
    if method != "HEAD":  # a HEAD answer has no body
        assert_row(reply, errors.WRONG_METHOD, errors.wrong_method_message(method, path))
    assert_clean(reply)
    assert not front.stub.calls


INVALID_BODIES = {
    # Refused by the transcoder as well (its local reply gets the row).
    "truncated": b'{"prompt":',
    "array": b"[1,2]",
    "null": b"null",
    "string": b'"a cat"',
    "trailing-data": b'{"prompt":"x"} {}',
    "int-as-text": b'{"prompt":"x","n":"abc"}',
    "fraction": b'{"prompt":"x","n":1.5}',
    "int32-overflow": b'{"prompt":"x","n":2147483648}',
    "prompt-number": b'{"prompt":123}',
    "nan": b'{"prompt":"x","extra":NaN}',
    "overflow": b'{"prompt":"x","extra":1e400}',
    "lone-surrogate": b'{"prompt":"x","extra":"\\ud800"}',
    "bom": b'\xef\xbb\xbf{"prompt":"x"}',
    "not-utf8": b'{"prompt":"\xff"}',
    "encoded-surrogate": b'{"prompt":"\xed\xa0\x80"}',
    "too-deep": b'{"prompt":"x","extra":' + b"[" * 100 + b"]" * 100 + b"}",
    # Accepted by the transcoder, refused by json.loads / OpenAI: the Lua filter stops them.
    "trailing-comma": b'{"prompt":"x",}',
    "single-quotes": b"{'prompt':'x'}",
    "bare-key": b'{prompt:"x"}',
    "control-char": b'{"prompt":"a\tb"}',
    "bool-as-text": b'{"prompt":"x","stream":"yes"}',
    "int-as-digits": b'{"prompt":"x","n":"3"}',
    "camel-int-as-digits": b'{"prompt":"x","partialImages":"1"}',
}


@pytest.mark.parametrize("body", INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
async def test_invalid_json(front: Front, body: bytes) -> None:
    reply = await fetch(
        "POST", front.url + GENERATE, body=body, headers={"Content-Type": "application/json"}
    )
    assert_row(reply, errors.INVALID_JSON)
    assert not front.stub.calls


VALID_BODIES = {
    "empty": (b"", images_pb2.GenerateImagesRequest()),
    "blank": (b" \n\t", images_pb2.GenerateImagesRequest()),
    "nulls": (b'{"prompt":null,"n":null}', images_pb2.GenerateImagesRequest()),
    "unknown-fields": (
        b'{"prompt":"x","extra":{"a":[1,null,true,-0.5e-3]}}',
        images_pb2.GenerateImagesRequest(prompt="x"),
    ),
    "camel-case": (
        b'{"responseFormat":"b64_json"}',
        images_pb2.GenerateImagesRequest(response_format="b64_json"),
    ),
    "integral-float": (
        b'{"n":3.0,"output_compression":1E1}',
        images_pb2.GenerateImagesRequest(n=3, output_compression=10),
    ),
    "duplicate-key": (b'{"prompt":"a","prompt":"b"}', images_pb2.GenerateImagesRequest(prompt="b")),
    "escapes": (
        b'{"prompt":"\\u00e9\\ud83d\\ude00\\/\\n"}',
        images_pb2.GenerateImagesRequest(prompt="é😀/\n"),
    ),
    "depth-100": (
        b'{"prompt":"x","extra":' + b"[" * 99 + b"]" * 99 + b"}",
        images_pb2.GenerateImagesRequest(prompt="x"),
    ),
}


@pytest.mark.parametrize(("body", "expected"), VALID_BODIES.values(), ids=VALID_BODIES.keys())
async def test_accepted_bodies(front: Front, body: bytes, expected: Message) -> None:
    reply = await fetch("POST", front.url + GENERATE + "?prompt=from-query&n=abc", body=body)
    assert reply.status == 200, reply.body
    # The query of a POST binds nothing (the transcoder would bind it; aiohttp does not).
    assert [c.request for c in front.stub.calls] == [expected]


async def test_body_limit(front: Front) -> None:
    def body(size: int) -> bytes:
        head = b'{"prompt":"x","pad":"'
        return head + b"a" * (size - len(head) - 2) + b'"}'

    reply = await fetch("POST", front.url + GENERATE, body=body(MiB))
    assert reply.status == 200 and len(front.stub.calls) == 1
    for size in (MiB + 1, 5 * MiB):
        assert_row(await fetch("POST", front.url + GENERATE, body=body(size)), errors.TOO_LARGE)
    assert len(front.stub.calls) == 1


async def test_request_id_kept_generated_and_forwarded(front: Front) -> None:
    # Without preserve_external_request_id this edge listener would replace it (measured).
    sent = "0f8fad5b-d9cb-469f-a165-70867728950e"
    reply = await fetch(
        "POST", front.url + GENERATE, json_body={"prompt": "x"}, headers={"X-Request-ID": sent}
    )
    assert reply.headers["x-request-id"] == front.stub.calls[-1].metadata["x-request-id"] == sent
    reply = await fetch("GET", front.url + "/v1/models")
    generated = reply.headers["x-request-id"]
    assert generated and generated == front.stub.calls[-1].metadata["x-request-id"]
    for method, path, body in (
        ("GET", "/nope", None),
        ("POST", GENERATE, b"{"),
        ("POST", GENERATE, b"x" * (MiB + 1)),
        ("PATCH", "/v1/models", None),
    ):
        reply = await fetch(method, front.url + path, body=body, headers={"X-Request-ID": "mine-1"})
        assert reply.headers["x-request-id"] == "mine-1", (method, path)


async def test_forwarded_headers(front: Front) -> None:
    await fetch(
        "POST",
        front.url + GENERATE,
        json_body={"prompt": "x"},
        headers={
            "Host": "images.example:8443",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "Idempotency-Key": "k1",
        },
    )
    metadata = front.stub.calls[-1].metadata
    assert metadata["x-forwarded-host"] == "images.example:8443"
    # This listener is plain HTTP; a client cannot claim otherwise.
    assert metadata["x-forwarded-proto"] == "http"
    assert metadata["idempotency-key"] == "k1"


# --- Envoy without a healthy service ----------------------------------------------


async def test_service_stopped_while_envoy_runs() -> None:
    server, stub = await start_stub()
    async with envoy_front(stub.port) as url:
        assert (await fetch("GET", url + "/v1/models")).status == 200
        await server.stop(None)
        reply = await fetch(
            "POST",
            url + GENERATE,
            json_body={"prompt": "x"},
            headers={"X-Request-ID": "while-down"},
        )
        assert_row(reply, errors.UNAVAILABLE)
        assert reply.headers["x-request-id"] == "while-down"


async def test_service_never_there() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with envoy_front(port) as url:
        assert_row(await fetch("GET", url + "/v1/models"), errors.UNAVAILABLE)


async def test_route_timeout_is_the_deadline_row() -> None:
    server, stub = await start_stub()
    try:
        front = await EnvoyFront.start(stub.port, route_timeout_s=0.5)
        try:
            stub.delay_s = 5
            reply = await fetch("POST", front.base_url + GENERATE, json_body={"prompt": "x"})
            assert_row(reply, errors.DEADLINE)
        finally:
            await front.stop()
        assert front.process.returncode == 0
    finally:
        await server.stop(None)


# --- `make envoy` beside another Envoy --------------------------------------------------


def _make_envoy_argv() -> list[str]:
    """The command `make envoy` runs (dry run), as an argument list."""
    dry = subprocess.run(
        ["make", "-n", "envoy"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    [line] = [line for line in dry.splitlines() if "/envoy -c " in line]
    return line.split()


def test_make_envoy_starts_beside_another_envoy(tmp_path: Path) -> None:
    # Hot restart would make both claim shared memory with base id 0; the second
    # then exits ("unable to bind domain socket"). Each gets free ports here.
    argv = _make_envoy_argv()
    assert argv[argv.index("-c") + 1] == "envoy.yaml"
    processes = []
    try:
        for i in range(2):
            config = tmp_path / f"envoy{i}.json"
            config.write_text(json.dumps(patched_config(1)))
            args = [str(REPO / argv[0]), *argv[1:]]
            args[args.index("-c") + 1] = str(config)
            with (tmp_path / f"envoy{i}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                )
        time.sleep(3)  # the second Envoy exited within a second when it clashed
        for i, process in enumerate(processes):
            assert process.poll() is None, (tmp_path / f"envoy{i}.log").read_text()[-2000:]
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
