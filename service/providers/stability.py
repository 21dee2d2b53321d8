"""Stability AI (kind `stability`): Stable Image Core, Ultra and SD3.5, one image per call.

`POST {base}/v2beta/stable-image/generate/{core|ultra|sd3}` with a multipart
form and `Accept: application/json`; the reply carries one base64 image and a
`finish_reason`. A safety refusal comes either as HTTP 403 named
`content_moderation` or as a 200 whose finish_reason is CONTENT_FILTERED (the
image then is a blurred stand-in, never delivered).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import aiohttp

from service.errors import ContentPolicy, ImagegateError, UpstreamError, UpstreamRejected
from service.providers.base import (
    AdapterDeps,
    GeneratedImage,
    Provider,
    ProviderResult,
    ProviderSettings,
    UpstreamCall,
)
from service.providers.http import (
    credential,
    scrub,
    status_error,
    upstream_errors,
)
from service.providers.jobs import aspect_ratio, json_object
from service.providers.json_split import SplitJson, image_of, parsed, read_reply_or_raise

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.stability.ai"
DEFAULT_ENV = "STABILITY_API_KEY"
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21")
# Catalog family -> endpoint; SD3 models share one endpoint and are named in the form.
ENDPOINTS = {"stable-image-core": "core", "stable-image-ultra": "ultra", "sd3": "sd3"}
# Stability's form field names, as our request's parameter names.
PARAMS = {"aspect_ratio": "size", "output_format": "output_format", "model": "model"}
# The key of the reply's image, decoded as a large reply arrives.
IMAGE_KEY = b"image"


class StabilityProvider:
    kind = "stability"

    def __init__(self, settings: ProviderSettings, deps: AdapterDeps, key: str) -> None:
        self.id = settings.id
        self._url = (settings.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._key = key
        self._http = deps.http
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)

    def max_n(self, upstream_model: str) -> int:
        return 1

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        request = call.request
        endpoint = _endpoint(request.model.family, call.upstream_model)
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("prompt", request.prompt)
        ratio = aspect_ratio(request.size, ASPECT_RATIOS)
        if ratio is not None:
            form.add_field("aspect_ratio", ratio)
        form.add_field("output_format", request.output_format)
        if endpoint == "sd3":
            form.add_field("model", call.upstream_model)
        headers = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        if request.user:
            # Stability's header for the end user, used against abuse.
            headers["stability-client-user-id"] = request.user
        url = f"{self._url}/v2beta/stable-image/generate/{endpoint}"
        async with (
            upstream_errors(self.id),
            self._http.post(url, data=form, headers=headers, timeout=self._timeout) as response,
        ):
            body = await read_reply_or_raise(response, self.id, IMAGE_KEY, self._failure)
        image = await parsed(self._image, body)
        log.debug("%s: %s image from %s", self.id, image.content_type, endpoint)
        return ProviderResult(images=[image])

    def _image(self, body: bytes | SplitJson) -> GeneratedImage:
        reply = json_object(body)
        if reply is None:
            raise UpstreamError(f"The upstream provider '{self.id}' sent a reply that is not JSON.")
        finish = reply.get("finish_reason")
        if finish == "CONTENT_FILTERED":
            raise ContentPolicy(
                f"The upstream provider '{self.id}' filtered the generated image for safety."
            )
        if finish not in (None, "SUCCESS"):
            raise UpstreamError(
                f"The upstream provider '{self.id}' did not finish the image "
                f"({scrub(str(finish), [self._key])})."
            )
        data, content_type = image_of(reply.get("image"), self.id)
        return GeneratedImage(data, content_type)

    def _failure(self, status: int, headers: Mapping[str, str], body: bytes) -> ImagegateError:
        reply = json_object(body) or {}
        errors = reply.get("errors")
        texts = [str(e) for e in errors] if isinstance(errors, list) else []
        detail = scrub("; ".join(texts), [self._key])
        if reply.get("name") == "content_moderation":
            return ContentPolicy(
                f"The upstream provider '{self.id}' refused the prompt: "
                f"{detail or 'flagged by content moderation'}"
            )
        error = status_error(self.id, status, headers, detail)
        if error is not None:
            return error
        return UpstreamRejected(
            f"The upstream provider '{self.id}' refused the request: {detail or f'HTTP {status}'}",
            param=_param(texts),
        )

    async def aclose(self) -> None:
        return None


def _endpoint(family: str, upstream_model: str) -> str:
    """The generate endpoint for the catalog family, or guessed from the model name."""
    if family in ENDPOINTS:
        return ENDPOINTS[family]
    name = upstream_model.removeprefix("stable-image-")
    if name.startswith("sd3"):
        return "sd3"
    return name if name in ("core", "ultra") else "core"


def _param(texts: list[str]) -> str:
    """Our parameter named by Stability's first "field: message" error, else "prompt"."""
    for text in texts:
        field, sep, _ = text.partition(":")
        if sep and field.strip() in PARAMS:
            return PARAMS[field.strip()]
    return "prompt"


def create(settings: ProviderSettings, deps: AdapterDeps) -> Provider:
    key = credential(deps.env, settings.api_key_env or DEFAULT_ENV)
    return StabilityProvider(settings, deps, key)
