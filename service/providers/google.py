"""Google Imagen on the Gemini API (kind `google`), and the Imagen wire format Vertex shares.

`POST {base}/v1beta/models/{model}:predict` with the `x-goog-api-key` header;
body `{"instances":[{"prompt"}],"parameters":{...}}`, reply `{"predictions":[...]}`
where each prediction is an image (`bytesBase64Encoded`, `mimeType`) or, because
we ask for `includeRaiReason`, the reason the safety filter dropped one
(`raiFilteredReason`). Some images filtered: the rest are delivered; all of
them: a ContentPolicy carrying Google's reason.

Errors are `{"error":{"code","message","status","details"}}`. Google says more
in `status` and `details` than in the HTTP code, so both are read: a bad API
key comes back as 400 INVALID_ARGUMENT with reason API_KEY_INVALID (our
credentials, not the caller's request), a prompt refused by the safety filter
as 400 INVALID_ARGUMENT with a Responsible-AI message (ContentPolicy), and a
429 carries its retry hint as a `google.rpc.RetryInfo` detail.

The credential is `GEMINI_API_KEY` (or the variable `api_key_env` names, e.g.
`GOOGLE_API_KEY`). Option `person_generation` (dont_allow | allow_adult |
allow_all) is passed through when set.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from service.catalog import CatalogError
from service.errors import ContentPolicy, ImagegateError, UpstreamError, UpstreamRejected
from service.providers.base import (
    AdapterDeps,
    GeneratedImage,
    ProviderResult,
    ProviderSettings,
    UpstreamCall,
)
from service.providers.http import (
    credential,
    retry_after,
    scrub,
    status_error,
    upstream_errors,
)
from service.providers.json_split import (
    SplitJson,
    image_of,
    loads,
    parsed,
    read_reply_or_raise,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
DEFAULT_ENV = "GEMINI_API_KEY"
# Imagen's sampleCount is 1-4.
MAX_IMAGES = 4
# Width/height of each aspect ratio Imagen accepts; a size maps to the nearest one.
ASPECT_RATIOS = {"1:1": 1.0, "3:4": 3 / 4, "4:3": 4 / 3, "9:16": 9 / 16, "16:9": 16 / 9}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
PERSON_GENERATION = ("dont_allow", "allow_adult", "allow_all")
# Google's reasons for refusing our credentials, whatever HTTP status carries them.
CREDENTIAL_REASONS = frozenset(
    {"API_KEY_INVALID", "API_KEY_EXPIRED", "CREDENTIALS_MISSING", "ACCESS_TOKEN_EXPIRED"}
)
# Imagen has no error code for an input refused by its safety filter, only these words.
SAFETY_MARKERS = (
    "responsible ai",
    "could not be submitted",
    "couldn't be submitted",
    "may violate our policies",
    "might violate our policies",
    "response is blocked",
)
ERROR_PREFIX = "Image generation failed with the following error:"
ALL_FILTERED = "Imagen's safety filters blocked every image generated for this prompt."
# The key of a prediction's image, decoded as a large reply arrives.
IMAGE_KEY = b"bytesBase64Encoded"


class GeminiImagen:
    """Imagen models through the Gemini API, with an API key."""

    kind = "google"

    def __init__(self, settings: ProviderSettings, deps: AdapterDeps, api_key: str) -> None:
        self.id = settings.id
        self._base = (settings.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._http = deps.http
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._options = settings.options
        self._key = api_key

    def max_n(self, upstream_model: str) -> int:
        return MAX_IMAGES

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        model = quote(call.upstream_model.removeprefix("models/"), safe="")
        url = f"{self._base}/v1beta/models/{model}:predict"
        body = predict_body(call, imagen_parameters(call, self._options))
        return await predict(
            self._http,
            self.id,
            url,
            {"x-goog-api-key": self._key},
            body,
            self._timeout,
            secrets=(self._key,),
        )

    async def aclose(self) -> None:
        """Nothing of its own: the session belongs to the registry."""


def create(settings: ProviderSettings, deps: AdapterDeps) -> GeminiImagen:
    check_options(settings)
    api_key = credential(deps.env, settings.api_key_env or DEFAULT_ENV)
    return GeminiImagen(settings, deps, api_key)


def check_options(settings: ProviderSettings) -> None:
    """A misspelt option is a catalog error at start-up, not an upstream 400 per request."""
    person = settings.options.get("person_generation")
    if person and person not in PERSON_GENERATION:
        raise CatalogError(
            f"provider {settings.id!r}: person_generation must be one of "
            f"{', '.join(PERSON_GENERATION)}"
        )


def aspect_ratio(size: str) -> str:
    """The Imagen aspect ratio nearest to a WIDTHxHEIGHT size (1:1 for anything else)."""
    try:
        width, height = (int(part) for part in size.split("x"))
        wanted = math.log(width / height)
    except (ValueError, ZeroDivisionError):
        return "1:1"
    return min(ASPECT_RATIOS, key=lambda name: abs(math.log(ASPECT_RATIOS[name]) - wanted))


def imagen_parameters(call: UpstreamCall, options: Mapping[str, str]) -> dict[str, Any]:
    """The `parameters` both Google APIs accept, from the validated request."""
    request = call.request
    parameters: dict[str, Any] = {
        "sampleCount": call.n,
        "aspectRatio": aspect_ratio(request.size),
        # Without it a filtered image simply goes missing; with it we can say why.
        "includeRaiReason": True,
    }
    if options.get("person_generation"):
        parameters["personGeneration"] = options["person_generation"]
    if request.output_format != "png":
        mime = MIME_TYPES.get(request.output_format)
        if mime is None:
            raise UpstreamRejected(
                f"Imagen makes PNG or JPEG images, not '{request.output_format}'.",
                param="output_format",
            )
        output: dict[str, Any] = {"mimeType": mime}
        if request.output_compression is not None:
            output["compressionQuality"] = request.output_compression
        parameters["outputOptions"] = output
    return parameters


def predict_body(call: UpstreamCall, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"instances": [{"prompt": call.request.prompt}], "parameters": parameters}


async def predict(
    http: aiohttp.ClientSession,
    provider_id: str,
    url: str,
    headers: Mapping[str, str],
    body: dict[str, Any],
    client_timeout: aiohttp.ClientTimeout,
    *,
    secrets: tuple[str, ...],
) -> ProviderResult:
    """One `:predict` call: the delivered images, or the domain error it amounts to."""
    data = json.dumps(body).encode()
    async with (
        upstream_errors(provider_id),
        http.post(
            url,
            data=data,
            headers={**headers, "Content-Type": "application/json"},
            timeout=client_timeout,
        ) as response,
    ):
        reply = await read_reply_or_raise(
            response,
            provider_id,
            IMAGE_KEY,
            lambda status, headers, raw: reply_error(provider_id, status, headers, raw, secrets),
        )
    images, reasons = await parsed(parse_predictions, reply, provider_id)
    if images:
        if reasons:
            log.info(
                "%s: %d image(s) filtered by Imagen's safety filters", provider_id, len(reasons)
            )
        return ProviderResult(images)
    raise ContentPolicy(scrub(reasons[0], secrets) if reasons else ALL_FILTERED)


def parse_predictions(
    body: bytes | SplitJson, provider_id: str
) -> tuple[list[GeneratedImage], list[str]]:
    """The images of a 200 reply, and the reasons given for the ones filtered out."""
    try:
        reply = loads(body)
    except ValueError:
        raise UpstreamError(
            f"The upstream provider '{provider_id}' sent a reply that is not JSON (HTTP 200)."
        ) from None
    # Imagen answers `{}` when its filters removed every image and no reason was asked for.
    predictions = reply.get("predictions", []) if isinstance(reply, dict) else None
    if not isinstance(predictions, list) or not all(isinstance(p, dict) for p in predictions):
        raise UpstreamError(f"The upstream provider '{provider_id}' sent a malformed reply.")
    images: list[GeneratedImage] = []
    reasons: list[str] = []
    for prediction in predictions:
        if "bytesBase64Encoded" in prediction:
            data, content_type = image_of(prediction["bytesBase64Encoded"], provider_id)
            # Vertex returns the rewritten prompt when prompt enhancement ran.
            enhanced = prediction.get("prompt")
            revised = enhanced if isinstance(enhanced, str) and enhanced else None
            images.append(GeneratedImage(data, content_type, revised))
        elif isinstance(prediction.get("raiFilteredReason"), str):
            reasons.append(prediction["raiFilteredReason"])
    return images, reasons


def reply_error(
    provider_id: str,
    status: int,
    headers: Mapping[str, str],
    raw: bytes,
    secrets: tuple[str, ...],
) -> ImagegateError:
    """The domain error for a Google error reply."""
    error = _error_object(raw)
    message = scrub(str(error.get("message", "")).removeprefix(ERROR_PREFIX), secrets)
    details = error.get("details")
    details = [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []
    google_status = str(error.get("status", ""))
    log.debug("%s: HTTP %d %s: %s", provider_id, status, google_status, message)
    if any(d.get("reason") in CREDENTIAL_REASONS for d in details):
        return UpstreamError(
            f"The upstream provider '{provider_id}' refused the gateway's credentials "
            f"(HTTP {status})."
        )
    failure = status_error(provider_id, status, headers, message)
    if failure is not None:
        if failure.retryable and failure.retry_after_s is None:
            failure.retry_after_s = _retry_delay(details)
        return failure
    if status == 400 and google_status in ("INVALID_ARGUMENT", ""):
        if any(marker in message.lower() for marker in SAFETY_MARKERS):
            return ContentPolicy(message)
        return UpstreamRejected(
            f"The upstream provider '{provider_id}' rejected the request: {message}"
        )
    # 404 unknown model, 400 FAILED_PRECONDITION (e.g. region not served): our
    # configuration, not the caller's request, so the next route may do better.
    return UpstreamError(
        f"The upstream provider '{provider_id}' failed with HTTP {status}: {message}"
    )


def _error_object(raw: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(raw)
    except ValueError:
        return {}
    error = reply.get("error") if isinstance(reply, dict) else None
    return error if isinstance(error, dict) else {}


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """Seconds from a google.rpc.RetryInfo detail ("17s"), Google's Retry-After."""
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            return retry_after(str(detail.get("retryDelay", "")).removesuffix("s"))
    return None
