"""OpenAI's Images wire format, shared by the openai, openai_compatible and azure_openai adapters.

One request body per model family, one reading of the reply (base64 images,
URLs fetched through the safe downloader, `revised_prompt`, `usage`), and one
mapping of OpenAI's and Azure's error bodies to domain errors. gpt-image calls
of one image can stream (`stream: true`): the reply is server-sent events,
`image_generation.partial_image` previews then `image_generation.completed`
(edits: `image_edit.*`). Edits and variations are multipart forms (edit_form,
variation_form), read back the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import aiohttp

from service.aio import off_loop
from service.errors import ContentPolicy, ImagegateError, UpstreamError, UpstreamRejected
from service.providers import sse
from service.providers.base import (
    CompletedImage,
    Downloader,
    GeneratedImage,
    PartialImage,
    ProviderResult,
    StreamEvent,
    TokenUsage,
    UpstreamCall,
)
from service.providers.http import (
    decode_image_b64,
    read_body,
    scrub,
    status_error,
    upstream_errors,
)
from service.providers.json_split import (
    Base64Value,
    SplitJson,
    image_of,
    loads,
    parsed,
    read_reply,
)

log = logging.getLogger(__name__)

GPT_IMAGE = "gpt-image"
DALL_E_2 = "dall-e-2"
DALL_E_3 = "dall-e-3"
# Any other family: an OpenAI-compatible server's own model, sent the common fields only.
GENERIC = ""

# How OpenAI (dall-e: content_policy_violation, gpt-image: moderation_blocked) and Azure
# (inner_error ResponsibleAIPolicyViolation, contentFilter) say "the safety system refused".
SAFETY_CODES = frozenset(
    {
        "content_policy_violation",
        "moderation_blocked",
        "contentFilter",
        "content_filter",
        "ResponsibleAIPolicyViolation",
    }
)
# Refusals of the gateway's own account: retrying cannot help, another route may.
ACCOUNT_CODES = frozenset(
    {"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"}
)
# Azure's and OpenAI's ways of saying the route itself is wrong (deployment, model).
ROUTE_CODES = frozenset({"DeploymentNotFound", "OperationNotSupported", "model_not_found"})
SAFETY_MESSAGE = "Your request was rejected by the upstream provider's safety system."
MAX_ERROR_BYTES = 1 << 20
# A usage count the upstream sent as something other than an integer.
INVALID_COUNT = -1
# OpenAI's limit for X-Client-Request-Id.
MAX_REQUEST_ID = 512


def family_of_name(name: str) -> str:
    """The family a model or deployment name shows, or GENERIC."""
    low = name.lower()
    if "gpt-image" in low:
        return GPT_IMAGE
    if "dall-e-3" in low or "dalle3" in low or "dalle-3" in low:
        return DALL_E_3
    if "dall-e-2" in low or "dalle2" in low or "dalle-2" in low:
        return DALL_E_2
    return GENERIC


def family(call: UpstreamCall) -> str:
    """The catalog's family for the model, else what its upstream or catalog name shows."""
    model = call.request.model
    return model.family or family_of_name(call.upstream_model) or family_of_name(model.id)


def max_n_for(name: str, unknown: int) -> int:
    """Images per call: dall-e-3 makes one, gpt-image and dall-e-2 up to ten."""
    found = family_of_name(name)
    if found == DALL_E_3:
        return 1
    return 10 if found else unknown


def request_body(call: UpstreamCall, fam: str, model: str | None) -> dict[str, Any]:
    """The JSON body for `fam`, with only the fields that family accepts.

    gpt-image models always answer base64 and refuse `response_format`; every
    other family is asked for `b64_json` so that no URL has to be fetched.
    """
    req = call.request
    body: dict[str, Any] = {} if model is None else {"model": model}
    body.update(prompt=req.prompt, n=call.n, size=req.size)
    if fam == GPT_IMAGE:
        body.update(quality=req.quality, output_format=req.output_format)
        optional: dict[str, object] = {
            "background": req.background,
            "output_compression": req.output_compression,
            "moderation": req.moderation,
        }
        body.update((k, v) for k, v in optional.items() if v is not None)
    else:
        if fam == DALL_E_3:
            if req.quality in ("standard", "hd"):
                body["quality"] = req.quality
            if req.style:
                body["style"] = req.style
        body["response_format"] = "b64_json"
    if req.user:
        body["user"] = req.user
    return body


def streams(fam: str, call: UpstreamCall) -> bool:
    """Whether this call streams upstream: gpt-image models stream, one image at a time
    (previews belong to a single image; several are asked for as one plain call)."""
    return fam == GPT_IMAGE and call.n == 1


def stream_body(body: Mapping[str, Any], call: UpstreamCall) -> dict[str, Any]:
    return {**body, "stream": True, "partial_images": call.request.partial_images}


# Filenames of the uploaded parts (OpenAI reads the type from the bytes and this name).
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


def edit_form(
    call: UpstreamCall, fam: str, model: str | None, *, stream: bool = False
) -> aiohttp.FormData:
    """POST /images/edits as OpenAI takes it: `image[]` files for gpt-image (up to 16),
    one `image` for dall-e-2, the `mask`, then the family's fields (never
    `response_format` for gpt-image; b64_json for the others); `stream` (gpt-image,
    one image) asks for image_edit.* events with the request's partial_images."""
    req = call.request
    form = _form(model)
    name = "image[]" if fam == GPT_IMAGE or len(call.images) > 1 else "image"
    for index, image in enumerate(call.images):
        _add_file(form, name, f"image_{index}", image.data, image.content_type)
    if call.mask is not None:
        _add_file(form, "mask", "mask", call.mask.data, call.mask.content_type)
    fields: dict[str, object] = {"prompt": req.prompt, "n": call.n, "size": req.size}
    if fam == GPT_IMAGE:
        fields.update(
            quality=req.quality,
            output_format=req.output_format,
            background=req.background,
            output_compression=req.output_compression,
            input_fidelity=req.input_fidelity,
        )
    else:
        fields["response_format"] = "b64_json"
    fields["user"] = req.user or None
    if stream:
        fields.update(stream="true", partial_images=req.partial_images)
    for key, value in fields.items():
        if value is not None:
            form.add_field(key, str(value))
    return form


def variation_form(call: UpstreamCall, model: str | None) -> aiohttp.FormData:
    """POST /images/variations (dall-e-2): one `image`, n, size, b64_json."""
    req = call.request
    form = _form(model)
    image = call.images[0]
    _add_file(form, "image", "image", image.data, image.content_type)
    form.add_field("n", str(call.n))
    form.add_field("size", req.size)
    form.add_field("response_format", "b64_json")
    if req.user:
        form.add_field("user", req.user)
    return form


def _form(model: str | None) -> aiohttp.FormData:
    form = aiohttp.FormData()
    if model is not None:
        form.add_field("model", model)
    return form


def _add_file(form: aiohttp.FormData, name: str, stem: str, data: bytes, ctype: str) -> None:
    # A stream, not bytes: aiohttp would warn that a large raw body blocks the loop.
    filename = f"{stem}.{EXTENSIONS.get(ctype, 'png')}"
    form.add_field(name, io.BytesIO(data), filename=filename, content_type=ctype)


def request_id_header(name: str, request_id: str) -> dict[str, str]:
    """`{name: request_id}` when the id is printable ASCII of an accepted length."""
    fits = 0 < len(request_id) <= MAX_REQUEST_ID
    if fits and request_id.isascii() and request_id.isprintable():
        return {name: request_id}
    return {}


@dataclass(frozen=True)
class Upstream:
    """How one adapter reaches its server: session, downloader, timeout, secrets to scrub."""

    provider_id: str
    http: aiohttp.ClientSession
    download: Downloader
    timeout_s: float
    secrets: tuple[str, ...] = ()

    async def generate(
        self,
        url: str,
        headers: Mapping[str, str],
        body: Mapping[str, Any],
        n: int,
        params: Mapping[str, str] | None = None,
    ) -> ProviderResult:
        """One POST; the images it produced (at most `n`) or the domain error it meant."""
        return await self._post(url, headers, n, params, json=body)

    async def upload(
        self,
        url: str,
        headers: Mapping[str, str],
        form: aiohttp.FormData,
        n: int,
        params: Mapping[str, str] | None = None,
    ) -> ProviderResult:
        """One multipart POST (edits, variations), its reply read as generate's."""
        return await self._post(url, headers, n, params, data=form)

    async def _post(
        self,
        url: str,
        headers: Mapping[str, str],
        n: int,
        params: Mapping[str, str] | None,
        **payload: Any,
    ) -> ProviderResult:
        async with self._answer(url, headers, params, payload) as response:
            body = await read_reply(response, self.provider_id)
        items, usage = await self._parsed(body, n)
        images = await self._images(items, url)
        return ProviderResult(images=images, usage=usage)

    @contextlib.asynccontextmanager
    async def _answer(
        self,
        url: str,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
        payload: Mapping[str, Any],
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One POST's response once it is known to be a 200; any other status raised as
        the domain error its body means, every transport failure as upstream_errors says."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with (
            upstream_errors(self.provider_id),
            self.http.post(
                url,
                **payload,
                headers=headers,
                params=params,
                timeout=timeout,
                # A redirect would carry our credential elsewhere: never follow one.
                allow_redirects=False,
            ) as response,
        ):
            log.debug("provider %s answered HTTP %d", self.provider_id, response.status)
            if response.status != 200:
                raise refusal(
                    self.provider_id,
                    response.status,
                    response.headers,
                    await self._error_payload(response),
                    self.secrets,
                )
            yield response

    async def stream(
        self,
        url: str,
        headers: Mapping[str, str],
        body: Mapping[str, Any] | aiohttp.FormData,
        n: int,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """One streaming POST (JSON, or an edit's multipart form): previews and images as
        the upstream sends them. A server that answers with plain JSON instead is read
        as `generate` reads it."""
        payload = {"data": body} if isinstance(body, aiohttp.FormData) else {"json": body}
        async with self._answer(url, headers, params, payload) as response:
            if response.content_type != "text/event-stream":
                items, usage = await self._parsed(await read_reply(response, self.provider_id), n)
                for i, image in enumerate(await self._images(items, url)):
                    yield CompletedImage(image, usage if i == 0 else TokenUsage())
                return
            async for block in sse.read_blocks(response, self.provider_id):
                # An image's event (megabytes of base64) in a thread; a progress
                # event of a few hundred bytes right here, cheaper than the hop.
                item = await off_loop(len(block), self._event, block)
                if item is not None:
                    yield item

    def _event(self, block: bytes) -> StreamEvent | None:
        event = sse.parse(block)
        if event is None:
            return None
        try:
            payload = json.loads(event.data)
        except ValueError:
            raise self._bad("a stream event that is not JSON") from None
        if not isinstance(payload, dict):
            raise self._bad("a stream event that is not a JSON object")
        kind = _text(payload.get("type")) or _text(event.event)
        if kind == "error" or "error" in payload:
            # {"error": {...}} as in a reply, or the error's fields at the top level.
            error = payload if isinstance(payload.get("error"), dict) else {"error": payload}
            raise refusal(self.provider_id, 200, {}, error, self.secrets)
        if kind.endswith(".partial_image"):
            data, content_type = decode_image_b64(payload.get("b64_json"), self.provider_id)
            index = payload.get("partial_image_index")
            index = index if isinstance(index, int) and not isinstance(index, bool) else 0
            return PartialImage(data, content_type, index)
        if kind.endswith(".completed"):
            data, content_type = decode_image_b64(payload.get("b64_json"), self.provider_id)
            image = GeneratedImage(data, content_type)
            return CompletedImage(image, self._usage(payload.get("usage")))
        return None  # an event this gateway has no use for

    async def _error_payload(self, response: aiohttp.ClientResponse) -> Any:
        try:
            raw = await read_body(response, self.provider_id, MAX_ERROR_BYTES)
            return json.loads(raw)
        except (UpstreamError, ValueError, UnicodeDecodeError):
            return None

    async def _parsed(self, body: bytes | SplitJson, n: int) -> tuple[list[_Item], TokenUsage]:
        return await parsed(self._parse, body, n)

    def _parse(self, body: bytes | SplitJson, n: int) -> tuple[list[_Item], TokenUsage]:
        try:
            payload = loads(body)
        except ValueError:
            raise self._bad("a reply that is not JSON") from None
        if not isinstance(payload, dict):
            raise self._bad("a reply that is not a JSON object")
        data = payload.get("data")
        if not isinstance(data, list):
            if isinstance(payload.get("error"), dict):
                # Some compatible servers report failures with HTTP 200.
                raise refusal(self.provider_id, 200, {}, payload, self.secrets)
            raise self._bad("a reply without 'data'")
        # Extra images are dropped unread: the caller asked for n.
        items = [self._item(entry) for entry in data[:n]]
        if not items:
            raise self._bad("a reply with no images")
        return items, self._usage(payload.get("usage"))

    def _item(self, entry: object) -> _Item:
        if not isinstance(entry, dict):
            raise self._bad("an image entry that is not an object")
        revised = entry.get("revised_prompt")
        revised = revised if isinstance(revised, str) and revised else None
        b64, url = entry.get("b64_json"), entry.get("url")
        if isinstance(b64, Base64Value) or (isinstance(b64, str) and b64):
            return _Item(revised, image=image_of(b64, self.provider_id))
        if isinstance(url, str) and url:
            return _Item(revised, url=url)
        if _filtered(entry.get("content_filter_results")):
            raise ContentPolicy(SAFETY_MESSAGE)
        raise self._bad("an image entry with neither 'b64_json' nor 'url'")

    def _usage(self, raw: object) -> TokenUsage:
        if not isinstance(raw, dict):
            return TokenUsage()
        total_in = self._count(raw, "input_tokens")
        details = raw.get("input_tokens_details")
        details = details if isinstance(details, dict) else {}
        image_in = self._count(details, "image_tokens")
        text_in = (
            self._count(details, "text_tokens") if "text_tokens" in details else total_in - image_in
        )
        return TokenUsage(text_in, image_in, self._count(raw, "output_tokens"))

    def _count(self, raw: Mapping[str, object], key: str) -> int:
        """The count as reported; the core judges it (costs.py refuses negative or absurd
        usage and charges per image), so a count that is not even an integer is passed
        as -1, which it refuses, rather than losing the images already made."""
        value = raw.get(key, 0)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            log.warning("provider %s reported a %s that is not an integer", self.provider_id, key)
            return INVALID_COUNT
        return value

    async def _images(self, items: list[_Item], url: str) -> list[GeneratedImage]:
        fetched: dict[int, tuple[bytes, str]] = {}

        async def fetch(index: int, target: str) -> None:
            # Relative URLs (some local servers) are relative to the request's URL.
            fetched[index] = await self.download.fetch(urljoin(url, target))

        try:
            async with asyncio.TaskGroup() as group:
                for index, item in enumerate(items):
                    if item.url is not None:
                        group.create_task(fetch(index, item.url))
        except BaseExceptionGroup as failures:
            # One failed download fails the call; report the first reason, not a group.
            raise _first_domain_error(failures) from None
        images = []
        for index, item in enumerate(items):
            data, content_type = item.image or fetched[index]
            images.append(GeneratedImage(data, content_type, item.revised_prompt))
        return images

    def _bad(self, what: str) -> UpstreamError:
        return UpstreamError(f"The upstream provider '{self.provider_id}' sent {what}.")


@dataclass(frozen=True)
class _Item:
    revised_prompt: str | None
    image: tuple[bytes, str] | None = None
    url: str | None = None


def _first_domain_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_domain_error(exc)
        if isinstance(exc, ImagegateError):
            return exc
    return group


def _filtered(results: object) -> bool:
    """Azure's per-image `content_filter_results`: did any category filter the image?"""
    if not isinstance(results, dict):
        return False
    return any(isinstance(v, dict) and v.get("filtered") is True for v in results.values())


def _text(value: object) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _api_version_refused(code: str, message: str) -> bool:
    # Azure: 400 {"code": "BadRequest", "message": "API version not supported"}.
    return code == "BadRequest" and "api version" in message.lower()


def refusal(
    provider_id: str,
    status: int,
    headers: Mapping[str, str],
    payload: object,
    secrets: tuple[str, ...] = (),
) -> ImagegateError:
    """The domain error for an OpenAI- or Azure-shaped error reply."""
    error = payload.get("error") if isinstance(payload, dict) else None
    error = error if isinstance(error, dict) else {}
    inner = error.get("inner_error") or error.get("innererror")
    inner_code = _text(inner.get("code")) if isinstance(inner, dict) else ""
    code = _text(error.get("code"))
    message = scrub(_text(error.get("message")), secrets)
    log.debug("provider %s refused: HTTP %d code %r", provider_id, status, code or inner_code)
    if code in ACCOUNT_CODES:
        return UpstreamError(
            f"The upstream provider '{provider_id}' refused the gateway's account ({code})."
        )
    common = status_error(provider_id, status, headers, message)
    if common is not None:
        return common
    if code in SAFETY_CODES or inner_code in SAFETY_CODES:
        return ContentPolicy(message or SAFETY_MESSAGE)
    param = error.get("param")
    if (
        status == 404
        or code in ROUTE_CODES
        or param == "model"
        or _api_version_refused(code, message)
    ):
        # The route's configuration, not the caller's request (the caller never names the
        # upstream model, deployment or API version): the next route may work.
        return UpstreamError(
            f"The upstream provider '{provider_id}' does not serve the configured model "
            f"({code or f'HTTP {status}'}): {message or f'HTTP {status}'}"
        )
    if 400 <= status < 500:
        return UpstreamRejected(
            f"The upstream provider '{provider_id}' rejected the request: "
            f"{message or f'HTTP {status}'}",
            param=param if isinstance(param, str) and param else "prompt",
        )
    detail = f": {message}" if message else ""
    return UpstreamError(f"The upstream provider '{provider_id}' answered HTTP {status}{detail}")
