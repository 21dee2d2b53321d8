"""Real servers on 127.0.0.1: the grpc.aio service, the aiohttp front, and Envoy."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
import openai
import pytest
from imagegate.v1 import images_pb2_grpc

from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service import keys
from service.config import Config
from service.money import usd_to_micros
from service.providers.registry import KIND_MODULES
from service.server import Service, message_size_options, start_service
from service.store.base import Store
from service.store.sqlite import SqliteStore
from tests.s3_server import MotoServer, S3Bucket

_names = itertools.count()
# Servers that tests start as subprocesses (they inherit this) serve /metrics on a free
# port: several run at once, and the machine's 9464/9465 may be taken.
os.environ.setdefault("IMAGEGATE_METRICS_ADDRESS", "127.0.0.1:0")
os.environ.setdefault("IMAGEGATE_REST_METRICS_ADDRESS", "127.0.0.1:0")
# `serve` in one process (service and front together) unless a test asks for workers.
os.environ.setdefault("IMAGEGATE_WORKERS", "1")


def service_config(data_dir: Path, **overrides: object) -> Config:
    return Config(data_dir=data_dir, **overrides)  # type: ignore[arg-type]


@dataclass
class Stack:
    """One service and its fronts, shared by a test module."""

    service: Service
    fronts: dict[str, str]

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.service.port}"


@dataclass
class Tenant:
    """An account with a key, made fresh for each test so balances never collide."""

    account: str
    account_id: int
    key: str
    key_id: str


async def start_stack(
    data_dir: Path,
    *,
    envoy: bool,
    env: Mapping[str, str] | None = None,
    kind_modules: Mapping[str, str] | None = None,
    **config: object,
) -> tuple[Stack, list]:
    """The service (with provider credentials from `env`, {} by default: a test never
    reads the machine's own) and its fronts; close with the returned closers in order."""
    service = await start_service(
        service_config(data_dir, **config),
        port=0,
        env={} if env is None else env,
        kind_modules=KIND_MODULES if kind_modules is None else {**KIND_MODULES, **kind_modules},
    )
    runner = await start_gateway(GatewayConfig(grpc_target=f"127.0.0.1:{service.port}"), port=0)
    fronts = {"aiohttp": f"http://127.0.0.1:{bound_port(runner)}"}
    closers: list[Callable[[], Awaitable[object]]] = [runner.cleanup, service.stop]
    if envoy:
        from tests.envoy_harness import envoy_front

        cm = envoy_front(service.port, rest_port=bound_port(runner))
        fronts["envoy"] = await cm.__aenter__()
        closers.insert(0, lambda: cm.__aexit__(None, None, None))
    return Stack(service, fronts), closers


# Both fronts by default; IMAGEGATE_TEST_FRONTS=aiohttp narrows a quick local run.
FRONTS = os.environ.get("IMAGEGATE_TEST_FRONTS", "aiohttp,envoy").split(",")


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    stack, closers = await start_stack(tmp_path_factory.mktemp("stack"), envoy="envoy" in FRONTS)
    yield stack
    for close in closers:
        await close()


@pytest.fixture(params=FRONTS)
def base_url(request: pytest.FixtureRequest, stack: Stack) -> str:
    """Each REST contract test runs once per front, with identical expectations."""
    return stack.fronts[request.param]


async def make_tenant(
    service: Service, credit_usd: str = "1", models: tuple[str, ...] | None = None
) -> Tenant:
    name = f"acct{next(_names)}"
    account = await service.store.create_account(name, usd_to_micros(credit_usd))
    key = keys.new_key()
    record = await service.store.create_key(
        name, keys.hash_key(key), keys.display_prefix(key), "test", models
    )
    return Tenant(name, account.id, key, record.id)


@pytest.fixture
async def tenant(stack: Stack) -> Tenant:
    return await make_tenant(stack.service)


_clients: list[openai.AsyncOpenAI] = []


def sdk(base_url: str, key: str, *, strict: bool = False) -> openai.AsyncOpenAI:
    """The official SDK pointed at a front; closed after the test.

    strict: the SDK validates every response against its types (required fields,
    Literal enumerations) and raises on any mismatch, as typed clients do.
    """
    # No retries: a test must see the first answer, not a retried one.
    client = openai.AsyncOpenAI(
        base_url=f"{base_url}/v1",
        api_key=key,
        max_retries=0,
        _strict_response_validation=strict,
    )
    _clients.append(client)
    return client


def strict_sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return sdk(base_url, key, strict=True)


@pytest.fixture(autouse=True)
async def _close_sdk_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().close()


@pytest.fixture
async def grpc_stub(stack: Stack) -> AsyncIterator[images_pb2_grpc.ImageServiceStub]:
    channel = grpc.aio.insecure_channel(
        stack.grpc_target, options=message_size_options(64 * 1024 * 1024)
    )
    yield images_pb2_grpc.ImageServiceStub(channel)
    await channel.close()


async def balance(service: Service, account: str) -> int:
    acct = await service.store.get_account(account)
    assert acct is not None
    return acct.balance_micros


@pytest.fixture(scope="session")
async def postgres_server() -> str:
    """The machine's PostgreSQL. Skipped only locally when unreachable; CI must run these."""
    try:
        from tests import pg
    except ImportError as exc:  # asyncpg comes with the dev extra
        _unavailable(f"asyncpg is not installed ({exc})")
    url, why = await pg.find_server()
    if url is None:
        _unavailable(f"no PostgreSQL reachable ({why})")
    return url


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI=true, so the PostgreSQL tests must run", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
async def postgres_url(postgres_server: str) -> AsyncIterator[str]:
    """A URL to an empty schema of this test's own, dropped afterwards."""
    from tests import pg

    name, url = await pg.create_schema(postgres_server)
    yield url
    await pg.drop_schema(postgres_server, name)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh empty database for this test: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'imagegate.db'}"
    # From a sync fixture: an async fixture cannot be requested from inside the loop.
    return str(request.getfixturevalue("postgres_url"))


def store_for(url: str, clock: Callable[[], float] = time.time) -> Store:
    """The store a database URL selects (as open_store does), with a clock of the test's."""
    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url.removeprefix("sqlite:///")), clock=clock)
    from service.store.postgres import PostgresStore

    return PostgresStore(url, clock=clock)


@pytest.fixture(scope="session")
async def s3_server() -> AsyncIterator[MotoServer]:
    """A real S3-compatible server (moto's server mode) on loopback, for the session."""
    server = await MotoServer.start()
    yield server
    await server.stop()


@pytest.fixture
async def s3_bucket(s3_server: MotoServer) -> S3Bucket:
    """An empty bucket of this test's own."""
    return await s3_server.create_bucket()
