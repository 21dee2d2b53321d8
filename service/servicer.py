"""ImageService over gRPC: protobuf in, domain call, protobuf out. Nothing else."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import unquote

import grpc
from google.api import httpbody_pb2
from google.protobuf.message import DecodeError, Message
from imagegate.v1 import accounts_pb2, images_pb2, images_pb2_grpc
from imagegate.wire import B64_KEY, DATA_KEY, varint

from service import observe
from service.admin import Admin
from service.admin_servicer import (
    bucket_list,
    key_info,
    key_list,
    model_ids,
    page,
    usage_fields,
)
from service.aio import off_loop
from service.catalog import ModelSpec
from service.core import Caller, Generation, ImageCore, RequestContext, ResultImage
from service.errors import ImagegateError, InvalidParameter
from service.grpc_errors import (
    abort,
    internal_status,
    internal_status_message,
    status_message,
    to_status,
)
from service.idempotency import Idempotency
from service.links import LinkBase
from service.money import decimal_usd
from service.providers.base import TokenUsage
from service.requests import GenerationParams
from service.store.base import UsageRow
from service.streaming import ImageEvent, Send

log = logging.getLogger("imagegate.servicer")
T = TypeVar("T")
M = TypeVar("M", bound=Message)
# The event type prefix of streamed generations (edits stream as "image_edit").
GENERATION = "image_generation"
EDIT_EVENTS = "image_edit"
MiB = 1024 * 1024
# The values OpenAI's ImagesResponse may hold in these top-level fields. Typed
# clients validate them (the Python SDK's strict mode, older SDKs whose `size`
# is this Literal too), so any other value (the local model's "standard"/"hd",
# a 256x256 size) is left out rather than reported.
REPORTABLE: dict[str, frozenset[str]] = {
    "background": frozenset({"transparent", "opaque"}),
    "output_format": frozenset({"png", "webp", "jpeg"}),
    "quality": frozenset({"low", "medium", "high"}),
    "size": frozenset({"1024x1024", "1024x1536", "1536x1024"}),
}


class ImageServicer(images_pb2_grpc.ImageServiceServicer):
    def __init__(
        self, core: ImageCore, links: LinkBase, max_message_bytes: int, admin: Admin
    ) -> None:
        self._core = core
        # An account key's calls on its own keys and usage: the admin API's operations.
        self._admin = admin
        self._links = links
        self._max_message_bytes = max_message_bytes

    async def GenerateImages(
        self, request: images_pb2.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        async def call() -> bytes:
            caller = await self._caller(context)
            idempotency = _idempotency(context, "GenerateImages", request)
            return await self._core.generate(
                caller, _params(request), self._context(context), self._render, idempotency
            )

        return await self._run(context, call)

    async def EditImages(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """`request` is a serialized EditImagesRequest (service/server.py registers the
        upload RPCs raw), parsed here on a thread."""

        async def call() -> bytes:
            caller = await self._caller(context)
            content_type, data = await _upload_body(images_pb2.EditImagesRequest, request)
            idempotency = await _upload_idempotency(context, "EditImages", request)
            return await self._core.edit(
                caller, content_type, data, self._context(context), self._render, idempotency
            )

        return await self._run(context, call)

    async def StreamEditImages(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """A streamed edit: `request` as EditImages's, the events as StreamImages's."""

        async def call(send: Send) -> None:
            caller = await self._caller(context)
            content_type, data = await _upload_body(images_pb2.EditImagesRequest, request)
            idempotency_key = _metadata(context, "idempotency-key")
            await self._core.stream_edit(
                caller, content_type, data, self._context(context), send, idempotency_key
            )

        await self._stream(context, call, EDIT_EVENTS)

    async def CreateImageVariation(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        """`request` is a serialized CreateImageVariationRequest, as for EditImages."""

        async def call() -> bytes:
            caller = await self._caller(context)
            content_type, data = await _upload_body(images_pb2.CreateImageVariationRequest, request)
            idempotency = await _upload_idempotency(context, "CreateImageVariation", request)
            return await self._core.variation(
                caller, content_type, data, self._context(context), self._render, idempotency
            )

        return await self._run(context, call)

    def _context(self, context: grpc.aio.ServicerContext) -> RequestContext:
        return RequestContext(
            self._request_id(context), self._base_url(context), _deadline(context)
        )

    async def StreamImages(
        self, request: images_pb2.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def call(send: Send) -> None:
            caller = await self._caller(context)
            ctx = RequestContext(
                self._request_id(context), self._base_url(context), _deadline(context)
            )
            idempotency_key = _metadata(context, "idempotency-key")
            await self._core.stream(caller, _params(request), ctx, send, idempotency_key)

        await self._stream(context, call, GENERATION)

    async def _stream(
        self,
        context: grpc.aio.ServicerContext,
        call: Callable[[Send], Awaitable[None]],
        prefix: str,
    ) -> None:
        """Run a streamed call: each event one message whose type is `prefix`.partial_image
        or `prefix`.completed. An error before the first message is the RPC's status, as
        in a unary call; after it, an "error" event carrying that status comes first, so
        that REST fronts, which have sent their 200 already, can pass it on."""
        sent = False

        async def send(event: ImageEvent) -> None:
            nonlocal sent
            await context.write(_event(event, prefix))
            sent = True

        try:
            await call(send)
        except ImagegateError as err:
            if sent:
                await context.write(images_pb2.ImageEvent(type="error", error=status_message(err)))
            await abort(context, to_status(err))
        except Exception:
            log.exception("request %s failed", _metadata(context, "x-request-id"))
            if sent:
                error = internal_status_message()
                await context.write(images_pb2.ImageEvent(type="error", error=error))
            await abort(context, internal_status())

    async def _render(self, gen: Generation) -> bytes:
        """The response as it will be sent, encoded; the core charges only once this
        succeeded. Megabytes of images are joined on a thread (small replies here)."""
        parts = _response_parts(gen)
        size = sum(len(part) for part in parts)
        if size > self._max_message_bytes:
            # The caller's choice of n and format made it too big: a 400 they can act
            # on, not a 5xx that SDKs would retry into the same wall.
            raise InvalidParameter(
                f"The response would be {size / MiB:.1f} MiB, over this service's limit of "
                f"{self._max_message_bytes / MiB:.1f} MiB. Ask for fewer images, or for "
                "response_format 'url'.",
                param="n" if len(gen.images) > 1 else "response_format",
            )
        return await off_loop(size, b"".join, parts)

    async def ListModels(
        self, request: images_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.ModelList:
        async def call() -> images_pb2.ModelList:
            caller = await self._caller(context)
            models = [_model(m) for m in self._core.list_models(caller)]
            return images_pb2.ModelList(object="list", data=models)

        return await self._run(context, call)

    async def GetModel(
        self, request: images_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.Model:
        async def call() -> images_pb2.Model:
            caller = await self._caller(context)
            return _model(self._core.get_model(caller, request.model))

        return await self._run(context, call)

    async def GetImage(
        self, request: images_pb2.GetImageRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def call() -> httpbody_pb2.HttpBody:
            data, content_type = await self._core.get_image(
                request.image_id, request.expires, request.signature
            )
            return httpbody_pb2.HttpBody(content_type=content_type, data=data)

        return await self._run(context, call)

    async def GetBalance(
        self, request: images_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.Balance:
        async def call() -> images_pb2.Balance:
            balance = await self._core.balance(await self._caller(context))
            return images_pb2.Balance(
                object="balance",
                currency="usd",
                balance_micros=balance.balance_micros,
                held_micros=balance.held_micros,
                balance_usd=decimal_usd(balance.balance_micros),
                held_usd=decimal_usd(balance.held_micros),
            )

        return await self._run(context, call)

    async def ListUsage(
        self, request: images_pb2.ListUsageRequest, context: grpc.aio.ServicerContext
    ) -> images_pb2.UsageList:
        async def call() -> images_pb2.UsageList:
            caller = await self._caller(context)
            rows, has_more = await self._core.usage(caller, request.limit, request.after)
            return images_pb2.UsageList(**page([_usage_record(row) for row in rows], has_more))

        return await self._run(context, call)

    async def GetDailyUsage(
        self, request: images_pb2.GetDailyUsageRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.UsageBucketList:
        async def call() -> accounts_pb2.UsageBucketList:
            caller = await self._caller(context)
            return bucket_list(await self._admin.usage_by_day(caller.account_name, request.days))

        return await self._run(context, call)

    async def ListOwnKeys(
        self, request: images_pb2.ListOwnKeysRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.KeyList:
        async def call() -> accounts_pb2.KeyList:
            return key_list(await self._admin.list_own_keys(await self._caller(context)))

        return await self._run(context, call)

    async def CreateOwnKey(
        self, request: images_pb2.CreateOwnKeyRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.CreatedKey:
        async def call() -> accounts_pb2.CreatedKey:
            caller = await self._caller(context)
            models = model_ids(request.models) if request.HasField("models") else None
            key, view = await self._admin.create_own_key(caller, request.name, models)
            return accounts_pb2.CreatedKey(key=key, info=key_info(view))

        return await self._run(context, call)

    async def RevokeOwnKey(
        self, request: images_pb2.RevokeOwnKeyRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.KeyInfo:
        async def call() -> accounts_pb2.KeyInfo:
            caller = await self._caller(context)
            return key_info(await self._admin.revoke_own_key(caller, request.key_id))

        return await self._run(context, call)

    async def _run(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except ImagegateError as err:
            await abort(context, to_status(err))
        except Exception:
            log.exception("request %s failed", self._request_id(context))
            await abort(context, internal_status())

    async def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        return await self._core.authenticate(_metadata(context, "authorization"))

    def _request_id(self, context: grpc.aio.ServicerContext) -> str:
        # The interceptor's (grpc_observe.py), so the log line and the upstream agree.
        sent = observe.current().request_id or _metadata(context, "x-request-id")
        return sent or uuid.uuid4().hex

    def _base_url(self, context: grpc.aio.ServicerContext) -> str:
        return self._links.base_url(
            _peer_ip(context.peer()),
            _metadata(context, "x-forwarded-host"),
            _metadata(context, "x-forwarded-proto"),
        )


# The upload RPCs and their request messages (service/server.py registers them raw).
UPLOAD_METHODS: dict[str, type[Message]] = {
    "EditImages": images_pb2.EditImagesRequest,
    "StreamEditImages": images_pb2.EditImagesRequest,
    "CreateImageVariation": images_pb2.CreateImageVariationRequest,
}


async def _upload_body(message: type[Message], raw: bytes) -> tuple[str, bytes]:
    """The request's HttpBody (content type, data), parsed off the event loop: tens of MB."""

    def parse() -> tuple[str, bytes]:
        try:
            body = message.FromString(raw).body
        except DecodeError:
            raise InvalidParameter(
                "The request message could not be parsed as a protobuf.", param="body"
            ) from None
        return body.content_type, body.data

    return await asyncio.to_thread(parse)


def _peer_ip(peer: str | None) -> str | None:
    """'ipv4:127.0.0.1:5000' or 'ipv6:[::1]:5000' (maybe %-escaped) -> the address."""
    kind, _, address = unquote(peer or "").partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    return address.rpartition(":")[0].removeprefix("[").removesuffix("]") or None


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's gRPC deadline on the monotonic clock the dispatcher uses."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    return None


def _idempotency(
    context: grpc.aio.ServicerContext, rpc: str, request: Message
) -> Idempotency[bytes] | None:
    """The call's Idempotency-Key, with the hash of its canonical request: the message
    (both fronts and gRPC clients send the same one for the same body), not its JSON."""
    key = _metadata(context, "idempotency-key")
    if key is None:
        return None
    digest = hashlib.sha256(rpc.encode() + b"\0" + request.SerializeToString(deterministic=True))
    return _stored_as_sent(key, digest.digest())


async def _upload_idempotency(
    context: grpc.aio.ServicerContext, rpc: str, raw: bytes
) -> Idempotency[bytes] | None:
    """As _idempotency, for the upload RPCs: their request arrives as bytes (both fronts
    build the same message for the same body), hashed as it came, on a thread (tens of MB)."""
    key = _metadata(context, "idempotency-key")
    if key is None:
        return None
    digest = await asyncio.to_thread(lambda: hashlib.sha256(rpc.encode() + b"\0" + raw).digest())
    return _stored_as_sent(key, digest)


def _stored_as_sent(key: str, request_hash: bytes) -> Idempotency[bytes]:
    """The reply is kept, and replayed, as the encoded ImagesResponse that was sent."""
    return Idempotency(key=key, request_hash=request_hash, encode=bytes, decode=bytes)


def _usage_record(row: UsageRow) -> images_pb2.UsageRecord:
    return images_pb2.UsageRecord(**usage_fields(row))


def _params(request: images_pb2.GenerateImagesRequest) -> GenerationParams:
    return GenerationParams(
        prompt=request.prompt,
        model=request.model,
        n=request.n if request.HasField("n") else None,
        size=request.size,
        quality=request.quality,
        response_format=request.response_format,
        style=request.style,
        user=request.user,
        background=request.background,
        output_format=request.output_format,
        output_compression=(
            request.output_compression if request.HasField("output_compression") else None
        ),
        moderation=request.moderation,
        stream=request.stream,
        partial_images=request.partial_images if request.HasField("partial_images") else None,
    )


def _model(spec: ModelSpec) -> images_pb2.Model:
    return images_pb2.Model(
        id=spec.id, object="model", created=spec.created, owned_by=spec.owned_by
    )


def _usage(usage: TokenUsage) -> images_pb2.Usage:
    return images_pb2.Usage(
        prompt_tokens=usage.input_tokens,
        completion_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        input_tokens=usage.input_tokens,
        input_tokens_details=images_pb2.InputTokensDetails(
            text_tokens=usage.input_text_tokens, image_tokens=usage.input_image_tokens
        ),
        output_tokens=usage.output_tokens,
    )


def _event(event: ImageEvent, prefix: str) -> images_pb2.ImageEvent:
    message = images_pb2.ImageEvent(
        type=f"{prefix}.completed" if event.completed else f"{prefix}.partial_image",
        b64_json=event.data,
        background=event.background,
        created_at=event.created_at,
        output_format=event.output_format,
        quality=event.quality,
        size=event.size,
    )
    if event.partial_image_index is not None:
        message.partial_image_index = event.partial_image_index
    if event.usage is not None:
        message.usage.CopyFrom(_usage(event.usage))
    return message


def _response_parts(gen: Generation) -> list[bytes]:
    """The ImagesResponse's encoding in parts, to be joined as they are: its images'
    bytes go in between the small messages upb encodes, so that the join is their one
    copy. (upb copies them into the message, then encodes it into a buffer it grows by
    copying: 10 ms holding the GIL for 8 MB.) Protobuf takes fields in any order, and
    appends the entries of a repeated field wherever they come."""
    parts = [_response(gen, with_data=False).SerializeToString()]
    for image in gen.images:
        item = _image(image).SerializeToString()
        if image.data is None:
            parts += (DATA_KEY, varint(len(item)), item)
            continue
        head = B64_KEY + varint(len(image.data))
        length = len(item) + len(head) + len(image.data)
        parts += (DATA_KEY, varint(length), item, head, image.data)
    return parts


def _response(gen: Generation, *, with_data: bool = True) -> images_pb2.ImagesResponse:
    response = images_pb2.ImagesResponse(created=gen.created, usage=_usage(gen.usage))
    if with_data:
        response.data.extend(_image(image, with_bytes=True) for image in gen.images)
    for name, allowed in REPORTABLE.items():
        value = getattr(gen, name)
        if value in allowed:
            setattr(response, name, value)
    return response


def _image(image: ResultImage, *, with_bytes: bool = False) -> images_pb2.Image:
    item = images_pb2.Image(url=image.url, revised_prompt=image.revised_prompt)
    if with_bytes and image.data is not None:
        item.b64_json = image.data
    return item
