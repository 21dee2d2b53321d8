"""AWS Bedrock runtime (kind `bedrock`): InvokeModel for Nova Canvas, Titan Image and Stability.

`POST {endpoint}/model/{modelId}/invoke`, SigV4-signed by botocore (service
`bedrock`) and sent on the provider's pooled aiohttp session. botocore is an
optional dependency (`pip install 'imagegate[bedrock]'`), imported when a
bedrock provider is built; without it the provider is MissingCredentials.

Credentials come from botocore's standard chain (environment, shared files,
SSO, container and instance roles; only the environment when the registry was
given a mapping other than os.environ), resolved once when the provider is built,
which may probe the instance metadata service (the registry calls `create`
in a thread). Temporary credentials refresh themselves inside botocore; signing runs
in a thread, so such a refresh never blocks the loop. Region: option `region`,
else `AWS_REGION` / `AWS_DEFAULT_REGION`. `base_url` is boto3's `endpoint_url`.

Bodies by family (catalog `family`, else read from the model id):
- nova-canvas, titan-image: `{"taskType":"TEXT_IMAGE",...}` -> `{"images":[b64],"error"}`;
  an `error` on a 200 means the output was filtered.
- stability: `{"prompt","aspect_ratio","output_format","mode"}` ->
  `{"seeds","finish_reasons":[null|"Filter reason: ..."],"images"}`.
Errors: the `x-amzn-ErrorType` header and `{"message"}`; a ValidationException
saying "blocked by our content filters" is a safety refusal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from service.awslog import quiet_signing_log
from service.errors import ContentPolicy, ImagegateError, UpstreamError, UpstreamRejected
from service.providers.base import (
    AdapterDeps,
    GeneratedImage,
    MissingCredentials,
    ProviderResult,
    ProviderSettings,
    UpstreamCall,
)
from service.providers.http import (
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

SERVICE = "bedrock"
DEFAULT_ENDPOINT = "https://bedrock-runtime.{region}.amazonaws.com"
FAMILIES = ("nova-canvas", "titan-image", "stability")
# Nova Canvas and Titan make 1-5 images per call; Stability models one.
MAX_IMAGES = {"nova-canvas": 5, "titan-image": 5, "stability": 1}
PREMIUM = ("premium", "hd", "high")
STABILITY_RATIOS = {
    "21:9": 21 / 9,
    "16:9": 16 / 9,
    "3:2": 3 / 2,
    "5:4": 5 / 4,
    "1:1": 1.0,
    "4:5": 4 / 5,
    "2:3": 2 / 3,
    "9:16": 9 / 16,
    "9:21": 9 / 21,
}
STABILITY_FORMATS = ("png", "jpeg")
CONTENT_FILTER = "blocked by our content filters"
BAD_MODEL_ID = "model identifier is invalid"
# Every family's images are the strings of this key's array, decoded as a large reply arrives.
IMAGES_KEY = b"images"


class BedrockImages:
    """Image models on the Bedrock runtime of one region."""

    kind = "bedrock"

    def __init__(
        self,
        settings: ProviderSettings,
        deps: AdapterDeps,
        credentials: Any,
        region: str,
    ) -> None:
        self.id = settings.id
        self._endpoint = (settings.base_url or DEFAULT_ENDPOINT.format(region=region)).rstrip("/")
        self._http = deps.http
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._credentials = credentials
        self._region = region
        self._secrets: tuple[str, ...] = ()

    def max_n(self, upstream_model: str) -> int:
        return MAX_IMAGES.get(_family_of(upstream_model), 1)

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        family = family_for(call)
        body = json.dumps(request_body(family, call)).encode()
        # Encoded as boto3 does ("amazon.nova-canvas-v1%3A0"), and sent exactly as signed.
        url = f"{self._endpoint}/model/{quote(call.upstream_model, safe='')}/invoke"
        headers = await asyncio.to_thread(self._sign, url, body)
        async with (
            upstream_errors(self.id),
            self._http.post(
                URL(url, encoded=True), data=body, headers=headers, timeout=self._timeout
            ) as response,
        ):
            reply = await read_reply_or_raise(response, self.id, IMAGES_KEY, self._error)
        images, refusal = await parsed(parse_reply, reply, family, self.id)
        if images:
            return ProviderResult(images)
        raise ContentPolicy(scrub(refusal, self._secrets))

    def _sign(self, url: str, body: bytes) -> dict[str, str]:
        """SigV4 headers for the request (in a thread: temporary credentials may refresh)."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.exceptions import BotoCoreError

        try:
            frozen = self._credentials.get_frozen_credentials()
        except BotoCoreError as exc:
            raise UpstreamError(
                f"The upstream provider '{self.id}' has no usable AWS credentials "
                f"({type(exc).__name__})."
            ) from None
        self._secrets = tuple(s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s)
        request = AWSRequest(
            method="POST",
            url=url,
            data=body,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        SigV4Auth(frozen, SERVICE, self._region).add_auth(request)
        return dict(request.headers.items())

    def _error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ImagegateError:
        kind = headers.get("x-amzn-ErrorType", "").split(":")[0]
        message = scrub(_message(raw), self._secrets)
        log.debug("%s: HTTP %d %s: %s", self.id, status, kind, message)
        if kind == "ValidationException":
            if CONTENT_FILTER in message.lower():
                return ContentPolicy(message)
            if BAD_MODEL_ID in message.lower():
                # Our catalog names a model this account or region does not have.
                return UpstreamError(
                    f"The upstream provider '{self.id}' refused the model id: {message}"
                )
        failure = status_error(self.id, status, headers, message)
        if failure is not None:
            return failure
        if kind == "ValidationException":
            return UpstreamRejected(
                f"The upstream provider '{self.id}' rejected the request: {message}"
            )
        # ResourceNotFound, ServiceQuotaExceeded (a 400!), ModelError: not the caller's
        # request, so another route may serve it; a model error may pass on a retry.
        return UpstreamError(
            f"The upstream provider '{self.id}' failed with HTTP {status} "
            f"({kind or 'no error type'}): {message}",
            retryable=kind == "ModelErrorException",
        )

    async def aclose(self) -> None:
        """Nothing of its own: the session belongs to the registry."""


def create(settings: ProviderSettings, deps: AdapterDeps) -> BedrockImages:
    try:
        import botocore.credentials
        import botocore.session
    except ImportError:
        raise MissingCredentials(
            "botocore is not installed (pip install 'imagegate[bedrock]')"
        ) from None
    quiet_signing_log()
    region = (
        settings.options.get("region")
        or deps.env.get("AWS_REGION")
        or deps.env.get("AWS_DEFAULT_REGION")
    )
    if not region:
        raise MissingCredentials(
            f"provider '{settings.id}' has no AWS region: set option 'region' or AWS_REGION"
        )
    # The chain's first link reads the environment we were given; the rest (shared
    # files, SSO, container and instance roles) belong to the machine, so they are
    # asked only when that environment is the process's own: a test's is the whole truth.
    credentials = botocore.credentials.EnvProvider(environ=dict(deps.env)).load()
    if credentials is None and deps.env is os.environ:
        credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise MissingCredentials(
            "no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, "
            "SSO, or a container or instance role)"
        )
    return BedrockImages(settings, deps, credentials, region)


def _family_of(model: str) -> str:
    if "nova-canvas" in model:
        return "nova-canvas"
    if "titan-image" in model:
        return "titan-image"
    if "stability." in model:
        return "stability"
    return ""


def family_for(call: UpstreamCall) -> str:
    """The body shape: the catalog's `family`, else what the model id says."""
    family = call.request.model.family or _family_of(call.upstream_model)
    if family not in FAMILIES:
        raise UpstreamError(
            f"Bedrock model '{call.upstream_model}' is not one of the image families "
            f"this gateway speaks ({', '.join(FAMILIES)})."
        )
    return family


def request_body(family: str, call: UpstreamCall) -> dict[str, Any]:
    request = call.request
    if family == "stability":
        if request.output_format not in STABILITY_FORMATS:
            raise UpstreamRejected(
                f"Stability models on Bedrock make PNG or JPEG images, not "
                f"'{request.output_format}'.",
                param="output_format",
            )
        return {
            "prompt": request.prompt,
            "mode": "text-to-image",
            "aspect_ratio": _nearest_ratio(request.width, request.height),
            "output_format": request.output_format,
        }
    return {
        "taskType": "TEXT_IMAGE",
        "textToImageParams": {"text": request.prompt},
        "imageGenerationConfig": {
            "numberOfImages": call.n,
            "width": request.width,
            "height": request.height,
            "quality": "premium" if request.quality in PREMIUM else "standard",
        },
    }


def _nearest_ratio(width: int, height: int) -> str:
    wanted = math.log(width / height)
    return min(STABILITY_RATIOS, key=lambda r: abs(math.log(STABILITY_RATIOS[r]) - wanted))


def parse_reply(
    body: bytes | SplitJson, family: str, provider_id: str
) -> tuple[list[GeneratedImage], str]:
    """The delivered images of a 200 reply, and the refusal text when there are none."""
    try:
        reply = loads(body)
    except ValueError:
        raise UpstreamError(
            f"The upstream provider '{provider_id}' sent a reply that is not JSON (HTTP 200)."
        ) from None
    images = reply.get("images") if isinstance(reply, dict) else None
    images = [] if images is None else images
    if not isinstance(images, list):
        raise UpstreamError(f"The upstream provider '{provider_id}' sent a malformed reply.")
    if family == "stability":
        return _stability(reply, images, provider_id)
    decoded = [_image(value, provider_id) for value in images]
    error = reply.get("error")
    if decoded or (isinstance(error, str) and error):
        return decoded, str(error or "")
    raise UpstreamError(f"The upstream provider '{provider_id}' sent a reply without images.")


def _stability(
    reply: dict[str, Any], images: list[Any], provider_id: str
) -> tuple[list[GeneratedImage], str]:
    reasons = reply.get("finish_reasons")
    reasons = reasons if isinstance(reasons, list) else []
    delivered, refusals, failures = [], [], []
    for index in range(max(len(images), len(reasons))):
        reason = reasons[index] if index < len(reasons) else None
        if reason is None and index < len(images):
            delivered.append(_image(images[index], provider_id))
        elif isinstance(reason, str) and reason.lower().startswith("filter reason"):
            refusals.append(reason)
        else:
            failures.append(str(reason or "no image"))
    if delivered or refusals:
        return delivered, refusals[0] if refusals else ""
    detail = f": {failures[0]}" if failures else ""
    raise UpstreamError(
        f"The upstream provider '{provider_id}' sent no image{detail}.",
        retryable=bool(failures),
    )


def _image(value: object, provider_id: str) -> GeneratedImage:
    data, content_type = image_of(value, provider_id)
    return GeneratedImage(data, content_type)


def _message(raw: bytes) -> str:
    try:
        reply = json.loads(raw)
    except ValueError:
        return ""
    if not isinstance(reply, dict):
        return ""
    return str(reply.get("message") or reply.get("Message") or "")
