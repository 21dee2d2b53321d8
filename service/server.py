"""Server wiring: open the store, build the core, serve ImageService, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from imagegate.v1 import admin_pb2_grpc, images_pb2_grpc

from service import metrics
from service.admin import Admin
from service.admin_servicer import AdminServicer
from service.catalog import Catalog, InputRules, load_catalog
from service.config import Config
from service.core import Caller, ImageCore
from service.errors import InvalidParameter
from service.grpc_errors import abort, to_status
from service.grpc_observe import Observer
from service.images import ImageStore, load_or_create_secret
from service.imagestore import is_s3, open_backend
from service.inputs import InputLoader
from service.instances import Liveness
from service.key_cache import KeyCache
from service.lifecycle import ADMIN_SERVICE_NAME, SERVICE_NAME, InFlight, Readiness
from service.limits import Limiter, Limits
from service.links import DEFAULT_REST_URL, LinkBase, bind_address, parse_networks
from service.providers.download import SafeDownloader
from service.providers.registry import DOWNLOAD_TIMEOUT_S, KIND_MODULES, Registry, build_registry
from service.servicer import UPLOAD_METHODS, ImageServicer
from service.store.base import Store
from service.store.sqlite import SqliteStore

log = logging.getLogger("imagegate.server")


def message_size_options(limit: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def open_store(config: Config) -> Store:
    """The store the database URL names; PostgreSQL's driver is imported only when used."""
    if config.uses_postgres:
        from service.store.postgres import PostgresStore

        return PostgresStore(config.database_url, pool_size=config.database_pool_size)
    return SqliteStore(config.sqlite_path)


def servable(catalog: Catalog, registry: Registry) -> Catalog:
    """Only routes to live providers, and only models left with one: the others would
    fail every call. Not listed in /v1/models either."""
    served = catalog.served(registry.live)
    dropped = sorted(set(catalog.models) - set(served.models))
    if dropped:
        log.info("models not served (no live provider on any route): %s", ", ".join(dropped))
    return served


@dataclass
class Service:
    """A running ImageService and everything it owns; stop() releases all of it."""

    config: Config
    store: Store
    core: ImageCore
    server: grpc.aio.Server
    port: int
    # The live provider adapters (and every declared provider's status).
    registry: Registry
    # Image URL policy; `serve` sets links.fallback_url once its REST front is bound.
    links: LinkBase
    liveness: Liveness
    limiter: Limiter
    # The health service's answer, and the ImageService calls in flight (for a drain).
    readiness: Readiness
    calls: InFlight
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def drain(self, grace_s: float, force: asyncio.Event) -> None:
        """Report NOT_SERVING and refuse new calls at once; let those in flight end within
        `grace_s` (or until `force` is set), then cancel the rest, each releasing its
        reservation. stop() afterwards."""
        self.calls.draining = True
        await self.readiness.drain()
        log.info("draining: %d calls in flight, grace %.0f s", self.calls.in_flight, grace_s)
        if not await self.calls.wait(grace_s, force):
            await self.calls.cancel_all()

    async def refresh_gauges(self) -> None:
        """The store's held reservations and every breaker, into the metrics gauges."""
        count, oldest = await self.store.held()
        metrics.open_reservations(count, 0.0 if oldest is None else max(0.0, time.time() - oldest))
        metrics.breakers(
            (h.provider, h.upstream_model, h.state) for h in self.core.dispatcher.health()
        )

    async def stop(self, grace: float | None = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # In-flight requests end here, each releasing or settling its reservation.
        await self.server.stop(grace)
        await self.liveness.retire()
        await self.limiter.close()
        await self.registry.aclose()
        await self.core.aclose()
        await self.store.close()


def input_loader(config: Config) -> InputLoader:
    """Edits' input images: the pixel cap, and remote image URLs only from listed hosts."""
    hosts = [h.strip() for h in config.image_url_hosts.split(",") if h.strip()]
    fetcher = (
        SafeDownloader(
            "image_url", hosts, max_bytes=InputRules.max_bytes, timeout_s=DOWNLOAD_TIMEOUT_S
        )
        if hosts
        else None
    )
    return InputLoader(max_pixels=config.max_upload_pixels, fetcher=fetcher)


async def start_service(
    config: Config,
    port: int | None = None,
    rest_url: str = DEFAULT_REST_URL,
    *,
    env: Mapping[str, str] | None = None,
    kind_modules: Mapping[str, str] = KIND_MODULES,
    private_port: int | None = None,
    reuse_port: bool = False,
) -> Service:
    """Start on config.host:port (config.grpc_port by default; 0 picks a free port).

    `rest_url`: the REST front's address, the base of image URLs when neither a
    public URL nor a trusted proxy says otherwise. `env` is where provider
    credentials come from (os.environ by default), read once here;
    `kind_modules` maps provider kinds to adapter modules (tests add fakes).
    A worker of `serve --workers N` shares its port with the others (`reuse_port`)
    and also listens on 127.0.0.1:`private_port`, its own, for the REST fronts.
    """
    catalog = load_catalog(config.catalog)
    links = LinkBase(config.public_url, parse_networks(config.trusted_proxies), rest_url)
    # Checks the Redis URL but connects only when used (and opening cannot fail).
    limiter = Limiter(config.redis_url, config.redis_prefix)
    store = open_store(config)
    await store.open()
    liveness = Liveness(store, config.instance_stale_s)
    env = os.environ if env is None else env
    images: ImageStore | None = None
    try:
        secret = url_secret(config)
        backend = await open_backend(config.image_store, config.data_dir / "images", env)
        log.info("images kept in %r", backend)
        images = ImageStore(backend, secret, config.image_ttl_s)
        registry = await build_registry(catalog.providers, env, kind_modules=kind_modules)
    except BaseException:
        if images is not None:
            await images.aclose()
        await store.close()
        raise
    await limiter.open()
    key_cache = KeyCache(config.key_cache_ttl_s)
    core = ImageCore(
        catalog=servable(catalog, registry),
        store=store,
        providers=registry.providers,
        images=images,
        default_model=config.default_model,
        upstream_timeout_s=config.upstream_timeout_s,
        reservation_ttl_s=config.reservation_ttl_s,
        owner=liveness.owner,
        inputs=input_loader(config),
        limiter=limiter,
        limit_defaults=Limits(
            rpm=config.limit_rpm,
            ipm=config.limit_ipm,
            concurrency=config.limit_concurrency,
            max_n=config.limit_max_n,
        ),
        idempotency_ttl_s=config.idempotency_ttl_s,
        key_cache=key_cache,
    )
    # The admin API sees every model of the catalog (served or not) and this
    # process's providers and breakers; what it revokes is refused here at once.
    admin = Admin(
        store,
        catalog=catalog,
        status=registry.status,
        health=core.dispatcher.health,
        key_changed=key_cache.forget,
    )
    servicer = ImageServicer(core, links, config.max_message_bytes, admin)
    readiness, calls = Readiness(), InFlight()
    try:
        # Recorded before serving, then what stopped processes left held is released
        # (at once for those of this machine), and what expired.
        await liveness.beat()
        await core.sweep()
        await readiness.update(catalog=bool(core.list_models(_EVERY_MODEL)))
        server, bound = await create_server(
            config,
            servicer,
            config.grpc_port if port is None else port,
            readiness,
            calls,
            AdminServicer(admin),
            private_port=private_port,
            reuse_port=reuse_port,
        )
        await server.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await liveness.retire()
        await limiter.close()
        await registry.aclose()
        await core.aclose()  # the image store and the input loader
        await store.close()
        raise
    service = Service(
        config, store, core, server, bound, registry, links, liveness, limiter, readiness, calls
    )
    service._tasks.append(asyncio.create_task(_sweep_forever(core, config.sweep_interval_s)))
    service._tasks.append(asyncio.create_task(_beat_forever(service, config.heartbeat_interval_s)))
    log.info("ImageService listening on %s:%d", config.host, bound)
    return service


def url_secret(config: Config) -> bytes:
    """The key that signs image links. Replicas that serve each other's links must
    share it: an S3 image store without a configured one is refused, since each
    replica would otherwise make its own and refuse the others' links."""
    if config.url_secret:
        return config.url_secret.encode()
    if is_s3(config.image_store):
        raise ValueError(
            "IMAGEGATE_IMAGE_STORE is an s3:// bucket shared by replicas: set "
            "IMAGEGATE_URL_SECRET too, the same on every replica (e.g. `openssl rand -hex 32`), "
            "so that a link signed by one replica is served by all"
        )
    return load_or_create_secret(config.data_dir / "url_secret")


# Replies that may carry megabytes of images: encoded by the servicer (the
# generations), or here in a thread (upb holds the GIL while it copies them).
_LARGE_REPLIES = frozenset(f"/{SERVICE_NAME}/{method}" for method in ("GenerateImages", "GetImage"))


class MessageCodec(grpc.aio.ServerInterceptor):
    """Requests decoded, and large replies encoded, by us rather than by grpc.aio.

    A request whose bytes do not decode gets INVALID_ARGUMENT with an imagegate
    reason (grpc.aio would answer UNKNOWN naming the protobuf exception class):
    each handler takes raw bytes and decodes them here, for every service.
    """

    def __init__(self) -> None:
        # Per method: the handler wrapped last time, and its wrapping (made once).
        self._made: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        made = self._made.get(details.method)
        if made is None or made[0] is not handler:
            made = (handler, _codec(handler, details.method))
            self._made[details.method] = made
        return made[1]


def _codec(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    serialize = handler.response_serializer

    async def decode(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return deserialize(raw)
        except Exception:
            message = f"The request is not a valid protobuf message for {method}."
            await abort(context, to_status(InvalidParameter(message, param="")))

    async def decoded(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        async for raw in raws:
            yield await decode(raw, context)

    kind = next(k for k in _KINDS if getattr(handler, k) is not None)
    behavior = getattr(handler, kind)
    streamed = kind.startswith("stream_")

    async def request(arg: Any, context: grpc.aio.ServicerContext) -> Any:
        return decoded(arg, context) if streamed else await decode(arg, context)

    wrapped: Callable[..., Any]
    if inspect.isasyncgenfunction(behavior):

        async def replies(arg: Any, context: grpc.aio.ServicerContext) -> Any:
            async for reply in behavior(await request(arg, context), context):
                yield reply

        wrapped = replies
    elif method in _LARGE_REPLIES and serialize is not None:
        encode = serialize

        async def large_reply(arg: Any, context: grpc.aio.ServicerContext) -> Any:
            reply = await behavior(await request(arg, context), context)
            if isinstance(reply, bytes):
                return reply  # encoded by the servicer (ImageServicer._render)
            # An image file (GetImage): a thread, as it may be megabytes.
            return await asyncio.to_thread(encode, reply)

        wrapped, serialize = large_reply, None  # grpc sends our bytes as they are
    else:

        async def reply(arg: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await request(arg, context), context)

        wrapped = reply
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    method_handler: grpc.RpcMethodHandler = factory(wrapped, None, serialize)
    return method_handler


_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


async def create_server(
    config: Config,
    servicer: ImageServicer,
    port: int,
    readiness: Readiness | None = None,
    calls: InFlight | None = None,
    admin: AdminServicer | None = None,
    *,
    private_port: int | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    readiness = readiness or Readiness()
    # Several workers on one port: the kernel spreads connections over them.
    reuse = [("grpc.so_reuseport", 1)] if reuse_port else []
    server = grpc.aio.server(
        options=message_size_options(config.max_message_bytes) + reuse,
        # The observer outermost: it also records calls the codec refuses.
        interceptors=[Observer(calls or InFlight()), MessageCodec()],
    )
    images_pb2_grpc.add_ImageServiceServicer_to_server(servicer, _RawUploads(server))
    services = [SERVICE_NAME]
    if admin is not None:
        admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
        services.append(ADMIN_SERVICE_NAME)
    await readiness.update()
    health_pb2_grpc.add_HealthServicer_to_server(readiness.servicer, server)
    reflection.enable_server_reflection(
        (
            *services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    bound = server.add_insecure_port(bind_address(config.host, port))
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {config.host}:{port}")
    if private_port is not None and server.add_insecure_port(f"127.0.0.1:{private_port}") == 0:
        raise OSError(f"cannot bind gRPC to 127.0.0.1:{private_port}")
    return server, bound


class _RawUploads:
    """The server as the generated registration sees it, handing the upload RPCs their
    request as raw bytes: the servicer parses those (up to the message limit, tens of MB)
    on a thread, where grpc would parse them on the event loop."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        # Registered handlers are what grpc looks up first for these exact paths.
        raw = {
            name: _raw(handler) if name in UPLOAD_METHODS else handler
            for name, handler in handlers.items()
        }
        self._server.add_registered_method_handlers(service, raw)


def _raw(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, without a request deserializer: it gets the message's bytes.
    A unary one also returns its reply encoded (ImageServicer._render)."""
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            handler.unary_stream, response_serializer=handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(handler.unary_unary)


# A caller allowed every model: does the catalog serve any?
_EVERY_MODEL = Caller(key_id="", account_id=0, account_name="", models=None)


async def _sweep_forever(core: ImageCore, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await core.sweep()
        except Exception:
            log.exception("sweep failed; retrying next interval")


async def _beat_forever(service: Service, interval_s: float) -> None:
    """The heartbeat, which also tells readiness whether the database answers, and the
    gauges read from the store (between scrapes, and for every worker of `--workers`)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await service.liveness.beat()
            await service.refresh_gauges()
        except Exception:
            log.exception("heartbeat failed; retrying next interval")
            await service.readiness.update(database=False)
        else:
            await service.readiness.update(database=True)
