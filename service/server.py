"""Server wiring: open the store, build the core, serve ImageService, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from imagegate.v1 import images_pb2, images_pb2_grpc

from service.catalog import Catalog, load_catalog
from service.config import Config
from service.core import ImageCore
from service.errors import InvalidParameter
from service.grpc_errors import abort, to_status
from service.images import ImageStore, load_or_create_secret
from service.providers.base import Provider
from service.providers.local import LocalProvider
from service.servicer import ImageServicer
from service.store.base import Store
from service.store.sqlite import SqliteStore

log = logging.getLogger("imagegate.server")
SERVICE_NAME = images_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name


def message_size_options(limit: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def open_store(config: Config) -> Store:
    return SqliteStore(config.sqlite_path)


def build_providers(config: Config) -> dict[str, Provider]:
    return {"local": LocalProvider()}


def servable(catalog: Catalog, providers: dict[str, Provider]) -> Catalog:
    """Only models whose provider is configured: the others would fail every call."""
    kept = {}
    for model_id, spec in catalog.models.items():
        if spec.provider in providers:
            kept[model_id] = spec
        else:
            log.warning("model %s skipped: provider %s is not configured", model_id, spec.provider)
    return replace(catalog, models=kept)


@dataclass
class Service:
    """A running ImageService and everything it owns; stop() releases all of it."""

    config: Config
    store: Store
    core: ImageCore
    server: grpc.aio.Server
    port: int
    providers: dict[str, Provider]
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float | None = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(grace)
        for provider in self.providers.values():
            await provider.aclose()
        await self.store.close()


async def start_service(config: Config, port: int | None = None) -> Service:
    """Start on config.host:port (config.grpc_port by default; 0 picks a free port)."""
    catalog = load_catalog(config.catalog)
    store = open_store(config)
    await store.open()
    providers = build_providers(config)
    secret = config.url_secret.encode() or load_or_create_secret(config.data_dir / "url_secret")
    core = ImageCore(
        catalog=servable(catalog, providers),
        store=store,
        providers=providers,
        images=ImageStore(config.data_dir / "images", secret, config.image_ttl_s),
        default_model=config.default_model,
        upstream_timeout_s=config.upstream_timeout_s,
        reservation_ttl_s=config.reservation_ttl_s,
    )
    # Reservations left held by a crash are released before serving anything.
    await core.sweep()
    server, bound = await create_server(config, core, config.grpc_port if port is None else port)
    await server.start()
    service = Service(config, store, core, server, bound, providers)
    service._tasks.append(asyncio.create_task(_sweep_forever(core, config.sweep_interval_s)))
    log.info("ImageService listening on %s:%d", config.host, bound)
    return service


# Replies that may carry megabytes of images: serialised in a thread (upb holds
# the GIL while it copies them; grpc's own send of them holds it again).
_LARGE_REPLIES = frozenset(f"/{SERVICE_NAME}/{method}" for method in ("GenerateImages", "GetImage"))


class MessageCodec(grpc.aio.ServerInterceptor):
    """Requests decoded, and large replies encoded, by us rather than by grpc.aio.

    A request whose bytes do not decode gets INVALID_ARGUMENT with an imagegate
    reason (grpc.aio would answer UNKNOWN naming the protobuf exception class):
    each handler takes raw bytes and decodes them here, for every service.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _codec(handler, details.method)


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


async def create_server(config: Config, core: ImageCore, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(
        options=message_size_options(config.max_message_bytes), interceptors=[MessageCodec()]
    )
    images_pb2_grpc.add_ImageServiceServicer_to_server(
        ImageServicer(core, config.public_url), server
    )
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    bound = server.add_insecure_port(f"{config.host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {config.host}:{port}")
    return server, bound


async def _sweep_forever(core: ImageCore, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await core.sweep()
        except Exception:
            log.exception("sweep failed; retrying next interval")
