"""The domain core: authenticate, validate, reserve, dispatch, store, settle. No grpc here."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from service import keys
from service.catalog import Catalog, ModelSpec
from service.errors import InvalidApiKey, ModelNotAllowed, ModelNotFound, UpstreamError
from service.images import ImageStore
from service.providers.base import GeneratedImage, Provider, TokenUsage, UpstreamCall
from service.requests import GenerationParams, ImageRequest, validate
from service.store.base import Charge, Store

log = logging.getLogger("imagegate.core")


@dataclass(frozen=True)
class Caller:
    key_id: str
    account_id: int
    account_name: str
    # None: every model.
    models: tuple[str, ...] | None


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    # Scheme://host[:port] the client used, so image URLs point back at the same front.
    base_url: str


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._store = store
        self._providers = providers
        self._images = images
        self._default_model = default_model
        self._upstream_timeout_s = upstream_timeout_s
        self._reservation_ttl_s = reservation_ttl_s
        self._clock = clock

    async def authenticate(self, authorization: str | None) -> Caller:
        key = keys.key_from_authorization(authorization)
        digest = keys.hash_key(key)
        record = await self._store.find_key(digest)
        # The lookup is by hash; the constant-time compare keeps the final check
        # free of timing differences whatever the index did.
        if (
            record is None
            or not hmac.compare_digest(record.key_hash, digest)
            or record.revoked_at is not None
        ):
            raise InvalidApiKey(keys.INVALID)
        return Caller(record.id, record.account_id, record.account_name, record.models)

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
        self, caller: Caller, params: GenerationParams, ctx: RequestContext
    ) -> Generation:
        # An unknown model's message names only the models this key may use.
        visible = [m.id for m in self.list_models(caller)]
        request = validate(params, self._catalog, self._default_model, available=visible)
        if caller.models is not None and request.model.id not in caller.models:
            raise ModelNotAllowed(
                f"This API key is not allowed to use the model '{request.model.id}'."
            )
        provider = self._providers[request.model.provider]
        charge = Charge(
            request_id=ctx.request_id,
            key_id=caller.key_id,
            model=request.model.id,
            n=request.n,
            size=request.size,
            quality=request.quality,
        )
        started = self._clock()
        reservation = await self._store.reserve(
            caller.account_id, request.quote, charge, started + self._reservation_ttl_s
        )
        log.debug("request %s prompt %r", ctx.request_id, request.prompt)
        try:
            generated, usage = await self._dispatch(provider, request, ctx)
            images = await self._deliver(generated, request, ctx)
        except BaseException:
            # Failed, timed out or cancelled (client gone): charge nothing. Shielded so
            # a cancellation cannot interrupt the release itself.
            await asyncio.shield(self._store.release(reservation))
            raise
        cost = len(images) * request.unit_price
        await asyncio.shield(self._store.settle(reservation, cost))
        log.info(
            "request %s account=%s model=%s n=%d/%d size=%s quality=%s cost=%d latency_ms=%d",
            ctx.request_id,
            caller.account_name,
            request.model.id,
            len(images),
            request.n,
            request.size,
            request.quality,
            cost,
            (self._clock() - started) * 1000,
        )
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

    async def _dispatch(
        self, provider: Provider, request: ImageRequest, ctx: RequestContext
    ) -> tuple[list[GeneratedImage], TokenUsage]:
        call = UpstreamCall(request, request.model.upstream_model, request.n, ctx.request_id)
        try:
            async with asyncio.timeout(self._upstream_timeout_s):
                result = await provider.generate(call)
        except TimeoutError:
            raise UpstreamError(
                f"The upstream provider did not answer within {self._upstream_timeout_s:g} s."
            ) from None
        # Never charge for more than was asked, even if an upstream sends extra.
        images = result.images[: request.n]
        if not images:
            raise UpstreamError("The upstream provider returned no images.")
        return images, result.usage

    async def _deliver(
        self, generated: list[GeneratedImage], request: ImageRequest, ctx: RequestContext
    ) -> list[ResultImage]:
        if request.response_format == "b64_json":
            return [ResultImage(data=g.data, revised_prompt=g.revised_prompt) for g in generated]
        ids = await asyncio.gather(*(self._images.put(g.data, g.content_type) for g in generated))
        return [
            ResultImage(
                url=ctx.base_url + self._images.signed_path(i), revised_prompt=g.revised_prompt
            )
            for i, g in zip(ids, generated, strict=True)
        ]

    async def get_image(self, image_id: str, expires: str, signature: str) -> tuple[bytes, str]:
        return await self._images.get(image_id, expires, signature)

    async def sweep(self) -> None:
        """Release reservations a crash left behind, and delete images past their links."""
        released = await self._store.release_expired(self._clock())
        removed = await self._images.sweep()
        if released or removed:
            log.info("sweep released=%d reservations removed=%d images", released, removed)
