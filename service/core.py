"""The domain core: authenticate, validate, reserve, dispatch, store, settle. No grpc here."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from service import costs, keys, metrics, observe, uploads
from service.aio import uninterrupted
from service.catalog import Catalog, ModelSpec
from service.errors import InvalidApiKey, InvalidParameter, ModelNotAllowed, ModelNotFound
from service.idempotency import HEADER as IDEMPOTENCY_HEADER
from service.idempotency import Idempotency, Keeper, check_key
from service.images import ImageStore
from service.inputs import InputLoader
from service.key_cache import KeyCache
from service.limits import Limiter, Limits, check_n, in_force
from service.providers.base import GeneratedImage, Provider, TokenUsage
from service.providers.dispatch import Dispatched, Dispatcher
from service.requests import (
    EDIT,
    GENERATE,
    OPERATION_NAMES,
    VARIATION,
    GenerationParams,
    ImageRequest,
    validate,
)
from service.store.base import (
    AccountBalance,
    Charge,
    Claim,
    KeyLimits,
    Served,
    Store,
    UnknownCursor,
    UsageRow,
    new_reservation_id,
)
from service.streaming import Delivered, Send, image_event

log = logging.getLogger("imagegate.core")
# Usage records per page: by default, and at most.
DEFAULT_PAGE = 20
MAX_PAGE = 100
T = TypeVar("T")
# Turns a Generation into what the transport sends; raises if it cannot be sent.
Render = Callable[["Generation"], Awaitable[T]]


@dataclass(frozen=True)
class Caller:
    key_id: str
    account_id: int
    account_name: str
    # None: every model.
    models: tuple[str, ...] | None
    limits: KeyLimits = field(default_factory=KeyLimits)


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    # Scheme://host[:port] the client used, so image URLs point back at the same front.
    base_url: str
    # The caller's deadline as time.monotonic(); None = none (upstream_timeout_s still bounds).
    deadline: float | None = None


@dataclass(frozen=True)
class ResultImage:
    url: str | None = None
    data: bytes | None = None
    revised_prompt: str | None = None


@dataclass(frozen=True)
class Generation:
    created: int
    images: list[ResultImage]
    usage: TokenUsage
    cost_micros: int
    # Reported only for models whose catalog entry says so (as OpenAI's gpt-image do).
    background: str | None = None
    output_format: str | None = None
    quality: str | None = None
    size: str | None = None


class ImageCore:
    def __init__(
        self,
        *,
        catalog: Catalog,
        store: Store,
        providers: Mapping[str, Provider],
        images: ImageStore,
        default_model: str,
        upstream_timeout_s: float,
        reservation_ttl_s: float,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        dispatcher: Dispatcher | None = None,
        inputs: InputLoader | None = None,
        limiter: Limiter | None = None,
        limit_defaults: Limits | None = None,
        idempotency_ttl_s: float = 86400.0,
        key_cache: KeyCache | None = None,
    ) -> None:
        self._catalog = catalog
        # Edits' and variations' input images: pixel cap, remote URL policy.
        self._inputs = inputs or InputLoader()
        self._store = store
        self._images = images
        self._default_model = default_model
        self._reservation_ttl_s = reservation_ttl_s
        # The Instance id recorded on reservations, so a restart knows whose they are.
        self._owner = owner
        self._clock = clock
        self._limiter = limiter or Limiter()
        self._limit_defaults = limit_defaults or Limits()
        self._idempotency_ttl_s = idempotency_ttl_s
        # Off unless given: a revocation then takes effect on the next request.
        self._keys = key_cache or KeyCache(0)
        self._keeper = Keeper(store, reservation_ttl_s, owner, clock)
        self.dispatcher = dispatcher or Dispatcher(
            providers,
            catalog.dispatch,
            provider_settings=catalog.providers,
            upstream_timeout_s=upstream_timeout_s,
        )

    async def authenticate(self, authorization: str | None) -> Caller:
        key = keys.key_from_authorization(authorization)
        digest = keys.hash_key(key)
        with observe.stage("auth"):
            record = self._keys.get(digest)
            if record is None:
                # Taken before the read: the entry expires ttl_s after what it saw.
                read_at = self._keys.now()
                record = await self._store.find_key(digest)
                if record is not None and record.revoked_at is None:
                    self._keys.put(digest, record, read_at)
        # The lookup is by hash; the constant-time compare keeps the final check
        # free of timing differences whatever the index did.
        if (
            record is None
            or not hmac.compare_digest(record.key_hash, digest)
            or record.revoked_at is not None
        ):
            raise InvalidApiKey(keys.INVALID)
        noted = observe.current()
        noted.key_id, noted.account = record.id, record.account_name
        return Caller(
            record.id, record.account_id, record.account_name, record.models, record.limits
        )

    def list_models(self, caller: Caller) -> list[ModelSpec]:
        return [
            self._catalog.models[model_id]
            for model_id in self._catalog.ids()
            if caller.models is None or model_id in caller.models
        ]

    def get_model(self, caller: Caller, model_id: str) -> ModelSpec:
        model = self._catalog.get(model_id)
        if model is None or (caller.models is not None and model_id not in caller.models):
            raise ModelNotFound(
                f"The model '{model_id}' does not exist or you do not have access to it."
            )
        return model

    async def generate(
        self,
        caller: Caller,
        params: GenerationParams,
        ctx: RequestContext,
        render: Render[T],
        idempotency: Idempotency[T] | None = None,
    ) -> T:
        """Reserve, generate, render, and charge only once `render` has succeeded.

        `render` builds what the transport will send (raising a domain error when
        it cannot be sent); whatever fails or is cancelled, at any moment, the
        reservation is resolved before this returns or raises. (A streamed request
        goes through `stream`, which charges per image handed over.) With
        `idempotency`, the request runs once per key of the account and its outcome
        is replayed to the others (service/idempotency.py).
        """
        if idempotency is not None:
            check_key(idempotency.key)
        request = self._validated(caller, params, GENERATE, streaming=False)
        return await self._once(caller, request, ctx, render, idempotency)

    async def edit(
        self,
        caller: Caller,
        content_type: str,
        body: bytes,
        ctx: RequestContext,
        render: Render[T],
        idempotency: Idempotency[T] | None = None,
    ) -> T:
        """POST /v1/images/edits: the body as the client sent it (multipart or JSON),
        parsed and checked here before anything is reserved; then as generate()."""
        if idempotency is not None:
            check_key(idempotency.key)
        request = await self._uploaded(caller, content_type, body, EDIT, streaming=False)
        return await self._once(caller, request, ctx, render, idempotency)

    async def stream_edit(
        self,
        caller: Caller,
        content_type: str,
        body: bytes,
        ctx: RequestContext,
        send: Send,
        idempotency_key: str | None = None,
    ) -> None:
        """A streamed edit (`stream` true in the body): as edit(), then as stream()."""
        _no_idempotent_stream(idempotency_key)
        request = await self._uploaded(caller, content_type, body, EDIT, streaming=True)
        await self.stream_request(caller, request, ctx, send)

    async def variation(
        self,
        caller: Caller,
        content_type: str,
        body: bytes,
        ctx: RequestContext,
        render: Render[T],
        idempotency: Idempotency[T] | None = None,
    ) -> T:
        """POST /v1/images/variations (multipart), as edit()."""
        if idempotency is not None:
            check_key(idempotency.key)
        request = await self._uploaded(caller, content_type, body, VARIATION, streaming=False)
        return await self._once(caller, request, ctx, render, idempotency)

    async def _uploaded(
        self, caller: Caller, content_type: str, body: bytes, operation: str, *, streaming: bool
    ) -> ImageRequest:
        """The upload parsed, validated, and its input images checked: nothing reserved yet."""
        parse = uploads.parse_edit if operation == EDIT else uploads.parse_variation
        # Tens of MB of multipart or JSON (base64) are parsed off the event loop.
        upload = await asyncio.to_thread(parse, content_type, body)
        request = self._validated(caller, upload.params, operation, streaming=streaming)
        inputs = await self._inputs.load(upload, request.model, variation=operation == VARIATION)
        return replace(request, inputs=inputs.images, mask=inputs.mask)

    async def _once(
        self,
        caller: Caller,
        request: ImageRequest,
        ctx: RequestContext,
        render: Render[T],
        idempotency: Idempotency[T] | None,
    ) -> T:
        """Every unary operation's way in: within the key's limits, once per key."""
        limits = self._limits(caller, request)
        if idempotency is None:
            return await self._admitted(caller, request, limits, ctx, render, None)
        encode = idempotency.encode
        return await self._keeper.once(
            caller.account_id,
            idempotency,
            ctx.deadline,
            lambda claim: self._admitted(caller, request, limits, ctx, render, (claim, encode)),
        )

    def _limits(self, caller: Caller, request: ImageRequest) -> Limits:
        """The key's limits in force; a 400 on `n` if no retry could meet them."""
        limits = in_force(caller.limits, self._limit_defaults)
        check_n(limits, request.n)
        return limits

    async def _admitted(
        self,
        caller: Caller,
        request: ImageRequest,
        limits: Limits,
        ctx: RequestContext,
        render: Render[T],
        keep: tuple[Claim, Callable[[T], bytes]] | None,
    ) -> T:
        """Within the key's limits (429 before anything is reserved), run the request."""
        async with self._limiter.admit(caller.key_id, limits, request.n):
            return await self._execute(caller, request, ctx, render, keep)

    async def _execute(
        self,
        caller: Caller,
        request: ImageRequest,
        ctx: RequestContext,
        render: Render[T],
        keep: tuple[Claim, Callable[[T], bytes]] | None,
    ) -> T:
        started = self._clock()
        reservation = await self._reserve(caller, request, ctx, started)
        log.debug("request %s prompt %r", ctx.request_id, request.prompt)
        try:
            dispatched = await self._dispatch(request, ctx)
            images = await self._deliver(dispatched.images, request, ctx)
            bill = costs.bill(request, dispatched.calls, request.quote)
            cost = bill.cost_micros
            served = Served(bill.provider, bill.upstream_model, bill.upstream_cost_micros)
            rendered = await render(_generation(request, started, images, bill.usage, cost))
            done = None
            if keep is not None:
                # Stored with the charge, in one transaction: never one without the other.
                claim, encode = keep
                done = (claim, await asyncio.to_thread(encode, rendered))
            with observe.stage("settle"):
                await uninterrupted(self._store.settle(reservation, cost, served, done=done))
        except BaseException:
            # Failed, timed out, unsendable or cancelled (client gone): charge nothing.
            # A settle that did commit makes this release a no-op (resolved once).
            with observe.stage("settle"):
                await uninterrupted(self._store.release(reservation))
            raise
        _note_served(request, served, len(images), cost)
        return rendered

    async def stream(
        self,
        caller: Caller,
        params: GenerationParams,
        ctx: RequestContext,
        send: Send,
        idempotency_key: str | None = None,
    ) -> None:
        """Reserve, then hand each event to `send` as it comes; charge what `send` took.

        Previews are free; each finished image is charged once `send` has returned
        for it. However the stream ends (done, failed after some events, the client
        gone), the images handed over are settled and the rest of the reservation
        released before this returns or raises.
        """
        _no_idempotent_stream(idempotency_key)
        await self.stream_request(
            caller, self._validated(caller, params, GENERATE, streaming=True), ctx, send
        )

    async def stream_request(
        self, caller: Caller, request: ImageRequest, ctx: RequestContext, send: Send
    ) -> None:
        """`stream` for a request already validated (with streaming=True), within the
        key's limits (429 before anything is reserved)."""
        limits = self._limits(caller, request)
        async with self._limiter.admit(caller.key_id, limits, request.n):
            await self._stream_admitted(caller, request, ctx, send)

    async def _stream_admitted(
        self, caller: Caller, request: ImageRequest, ctx: RequestContext, send: Send
    ) -> None:
        started = self._clock()
        reservation = await self._reserve(caller, request, ctx, started)
        log.debug("request %s prompt %r", ctx.request_id, request.prompt)
        delivered = Delivered()
        try:
            items = self.dispatcher.stream(
                request, request_id=ctx.request_id, deadline=ctx.deadline
            )
            try:
                async for item in items:
                    await send(image_event(request, item, self._clock()))
                    delivered.add(item)
            finally:
                await items.aclose()
        except BaseException:
            with observe.stage("settle"):
                await uninterrupted(self._settle_delivered(reservation, request, delivered))
            raise
        with observe.stage("settle"):
            settled = self._settle_delivered(reservation, request, delivered)
            served, cost = await uninterrupted(settled)
        _note_served(request, served, delivered.images, cost)

    async def _settle_delivered(
        self, reservation: str, request: ImageRequest, delivered: Delivered
    ) -> tuple[Served, int]:
        """Charge the images handed over, release the rest; nothing handed over: release all."""
        calls = delivered.calls()
        if not calls:
            await self._store.release(reservation)
            return Served("", "", 0), 0
        bill = costs.bill(request, calls, request.quote)
        served = Served(bill.provider, bill.upstream_model, bill.upstream_cost_micros)
        try:
            await self._store.settle(reservation, bill.cost_micros, served)
        except BaseException:
            await self._store.release(reservation)  # a no-op if the settle did commit
            raise
        return served, bill.cost_micros

    def _validated(
        self, caller: Caller, params: GenerationParams, operation: str, *, streaming: bool
    ) -> ImageRequest:
        # An unknown model's message names only the models this key may use.
        visible = [m.id for m in self.list_models(caller)]
        request = validate(
            params,
            self._catalog,
            self._default_model,
            available=visible,
            operation=operation,
            streaming=streaming,
        )
        _note(request)
        if caller.models is not None and request.model.id not in caller.models:
            raise ModelNotAllowed(
                f"This API key is not allowed to use the model '{request.model.id}'."
            )
        if operation != GENERATE and not self.dispatcher.serves(request.model.routes, operation):
            # The catalog says it can, but no live provider of its routes does.
            raise InvalidParameter(
                f"Model '{request.model.id}' does not support {OPERATION_NAMES[operation]} "
                "on this gateway.",
                param="model",
            )
        return request

    async def _reserve(
        self, caller: Caller, request: ImageRequest, ctx: RequestContext, started: float
    ) -> str:
        """Hold the quote. A cancellation landing while the store works waits for the
        store's answer and releases what it committed, so nothing stays held."""
        reservation = new_reservation_id()
        charge = Charge(
            request_id=ctx.request_id,
            key_id=caller.key_id,
            model=request.model.id,
            n=request.n,
            size=request.size,
            quality=request.quality,
        )
        held = asyncio.ensure_future(
            self._store.reserve(
                caller.account_id,
                request.quote,
                charge,
                started + self._reservation_ttl_s,
                reservation_id=reservation,
                owner=self._owner,
            )
        )
        try:
            with observe.stage("reserve"):
                await asyncio.shield(held)
        except asyncio.CancelledError:
            await uninterrupted(self._undo_reserve(held, reservation))
            raise
        return reservation

    async def _undo_reserve(self, held: asyncio.Future[str], reservation: str) -> None:
        try:
            await held
        except Exception:
            return  # nothing was held (e.g. the balance was too low)
        await self._store.release(reservation)

    async def _dispatch(self, request: ImageRequest, ctx: RequestContext) -> Dispatched:
        """Split, retry and fail over across the model's routes (providers/dispatch.py).
        Each call's images are cut to what it asked for: extra ones are neither
        returned nor charged."""
        try:
            with observe.stage("upstream"):
                return await self.dispatcher.dispatch(
                    request, request_id=ctx.request_id, deadline=ctx.deadline
                )
        finally:
            metrics.breakers(
                (h.provider, h.upstream_model, h.state) for h in self.dispatcher.health()
            )

    async def _deliver(
        self, generated: list[GeneratedImage], request: ImageRequest, ctx: RequestContext
    ) -> list[ResultImage]:
        if request.response_format == "b64_json":
            return [ResultImage(data=g.data, revised_prompt=g.revised_prompt) for g in generated]
        with observe.stage("store"):
            ids = await self._images.put_all([(g.data, g.content_type) for g in generated])
        return [
            ResultImage(
                url=ctx.base_url + self._images.signed_path(i), revised_prompt=g.revised_prompt
            )
            for i, g in zip(ids, generated, strict=True)
        ]

    async def get_image(self, image_id: str, expires: str, signature: str) -> tuple[bytes, str]:
        return await self._images.get(image_id, expires, signature)

    async def balance(self, caller: Caller) -> AccountBalance:
        return await self._store.balance(caller.account_id)

    async def usage(self, caller: Caller, limit: str, after: str) -> tuple[list[UsageRow], bool]:
        """A page of the caller's account's usage records, newest first, and whether
        older ones follow. `limit` and `after` as the query gave them ("" = not sent)."""
        count = page_size(limit)
        try:
            rows = await self._store.usage(caller.account_name, count + 1, after or None)
        except UnknownCursor:
            raise InvalidParameter(
                f"Invalid 'after': {after!r} is not the id of one of your usage records.",
                param="after",
            ) from None
        return rows[:count], len(rows) > count

    async def aclose(self) -> None:
        """Close what the core owns: the image store's connections."""
        await self._images.aclose()
        await self._inputs.aclose()

    async def sweep(self) -> None:
        """Release reservations a crash left behind, delete images past their links, and
        forget Idempotency-Keys past their time."""
        now = self._clock()
        released = await self._store.release_expired(now)
        removed = await self._images.sweep()
        forgotten = await self._store.sweep_idempotency(now - self._idempotency_ttl_s)
        if released or removed or forgotten:
            log.info(
                "sweep released=%d reservations removed=%d images forgot=%d idempotency keys",
                released,
                removed,
                forgotten,
            )


def _no_idempotent_stream(key: str | None) -> None:
    if key is not None:
        # A stream is not replayable: refused, rather than run twice for a retry.
        raise InvalidParameter(
            f"{IDEMPOTENCY_HEADER} is not supported with stream: true. Send the request "
            "without it, or without streaming.",
            param=IDEMPOTENCY_HEADER,
        )


def page_size(limit: str) -> int:
    """A usage page's size from the query's `limit` ("" = the default); 400 otherwise."""
    if not limit:
        return DEFAULT_PAGE
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE:
        raise InvalidParameter(
            f"Invalid 'limit': {limit[:20]!r}. Use a whole number from 1 to {MAX_PAGE}.",
            param="limit",
        )
    return int(limit)


def _note(request: ImageRequest) -> None:
    """What the request asks for, in its record (its log line and metrics labels)."""
    record = observe.current()
    record.model, record.n = request.model.id, request.n
    record.size, record.quality = request.size, request.quality


def _note_served(request: ImageRequest, served: Served, images: int, cost: int) -> None:
    record = observe.current()
    routes = zip(served.provider.split(","), served.upstream_model.split(","), strict=False)
    record.route = ",".join(f"{p}/{m}" for p, m in routes if p)
    record.images, record.cost_micros = images, cost
    record.upstream_cost_micros = served.upstream_cost_micros
    metrics.child(metrics.IMAGES, request.model.id).inc(images)


def _generation(
    request: ImageRequest, started: float, images: list[ResultImage], usage: TokenUsage, cost: int
) -> Generation:
    reported = request.model.reports_output
    return Generation(
        created=int(started),
        images=images,
        usage=usage,
        cost_micros=cost,
        # What was rendered: "auto" and unset come out opaque.
        background=("transparent" if request.background == "transparent" else "opaque")
        if reported
        else None,
        output_format=request.output_format if reported else None,
        quality=request.quality if reported else None,
        size=request.size if reported else None,
    )
