"""Fake OpenAI Images API and Azure OpenAI image endpoints, with their own replies and errors.

One server answers three paths:
- OpenAI (and any OpenAI-compatible server): `POST /v1/images/generations`,
  `Authorization: Bearer` (skipped when `openai_key` is None, like a local server);
- Azure, deployment form: `POST /openai/deployments/{deployment}/images/generations?api-version=`,
  header `api-key`;
- Azure v1 form: `POST /openai/v1/images/generations`, the deployment as `model`.
It also serves the images it hands out as URLs, under `/files/`, and the edit
and variation endpoints of both (tests/fakes/openai_edits.py). A gpt-image
request with `stream: true` is answered with OpenAI's server-sent events
(`partial_images` previews, then `image_generation.completed` with usage).

Bodies are checked the way OpenAI checks them, per model family: `response_format`
sent to a gpt-image model is a 400 `unknown_parameter`, as are fields the family
has no use for; dall-e-3 takes only n=1; sizes and qualities are the family's own.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

from aiohttp import web

from service.catalog import ModelSpec
from service.providers.base import UpstreamCall
from service.requests import ImageRequest
from tests.fakes.base import FakeUpstream, Fault, image_bytes
from tests.fakes.openai_edits import EditEndpoints

OPENAI_KEY = "sk-fake-openai-7c1d2e3f4a5b6c7d8e9f0a1b"
AZURE_KEY = "fake-azure-key-0f1e2d3c4b5a69788796a5b4"

COMMON = {"model", "prompt", "n", "size", "user"}
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt-image": {
        "fields": COMMON
        | {"quality", "background", "output_format", "output_compression", "moderation"}
        | {"stream", "partial_images"},
        "sizes": ("1024x1024", "1536x1024", "1024x1536", "auto"),
        "qualities": ("low", "medium", "high", "auto"),
        "n_max": 10,
    },
    "dall-e-3": {
        "fields": COMMON | {"quality", "response_format", "style"},
        "sizes": ("1024x1024", "1792x1024", "1024x1792"),
        "qualities": ("standard", "hd"),
        "n_max": 1,
    },
    "dall-e-2": {
        "fields": COMMON | {"quality", "response_format"},
        "sizes": ("256x256", "512x512", "1024x1024"),
        "qualities": ("standard",),
        "n_max": 10,
    },
    # A compatible server's own model: the common fields, any size.
    "generic": {
        "fields": COMMON | {"quality", "response_format"},
        "sizes": (),
        "qualities": (),
        "n_max": 10,
    },
}
# Output tokens per image by quality at 1024x1024, as OpenAI's gpt-image-1 reports them.
OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160, "auto": 1056}
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
OUTSIDE_URL = "https://images.not-allowed.example/generated/0.png"
METADATA_URL = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")


def family_of(model: str) -> str | None:
    if model.startswith(("gpt-image", "chatgpt-image")):
        return "gpt-image"
    if model in ("dall-e-2", "dall-e-3"):
        return model
    return None


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """OpenAI's error shape: all four keys, always."""
    error = {"message": message, "type": type_, "param": param, "code": code, **extra}
    return web.json_response({"error": error}, status=status, headers=headers)


def azure_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Azure's own error shape (gateway-level errors: auth, routing, throttling)."""
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


def content_filter_results(filtered: str | None = None) -> dict[str, Any]:
    return {
        category: {
            "filtered": category == filtered,
            "severity": "high" if category == filtered else "safe",
        }
        for category in ("hate", "self_harm", "sexual", "violence")
    }


class FakeOpenAI(EditEndpoints, FakeUpstream):
    """`openai_base` is the OpenAI SDK's base_url for it; `base_url` is Azure's endpoint."""

    def __init__(
        self,
        *,
        openai_key: str | None = OPENAI_KEY,
        azure_key: str = AZURE_KEY,
        deployments: Mapping[str, str] | None = None,
        compatible_models: Collection[str] = (),
        url_only: bool = False,
        oversize_bytes: int = 2 * 1024 * 1024,
    ) -> None:
        super().__init__()
        self.openai_key = openai_key
        self.azure_key = azure_key
        # Azure deployment name -> the model deployed there.
        self.deployments = dict(
            deployments
            or {
                "gpt-image-deploy": "gpt-image-1",
                "dalle3-deploy": "dall-e-3",
                "dalle2-deploy": "dall-e-2",
            }
        )
        # Models a compatible server serves under their own names (family "generic").
        self.compatible_models = set(compatible_models)
        # A compatible server that answers URLs whatever `response_format` says.
        self.url_only = url_only
        self.oversize_bytes = oversize_bytes
        # When set, error messages quote this text (e.g. a credential, to test scrubbing).
        self.echo_in_errors = ""
        # When set, replaces the `usage` of gpt-image replies (a lying upstream).
        self.usage_override: dict[str, Any] | None = None
        # Seconds the 429 fault asks to wait (Retry-After).
        self.retry_after = 7
        # Hand out URLs relative to the server, as some local servers do.
        self.relative_urls = False
        self.files: dict[str, bytes] = {}
        self._names = itertools.count()
        # Streams: after the previews, None sends the completed event, "error" an error
        # event, "cut" drops the connection.
        self.stream_end: str | None = None
        # When set, a stream waits for it before its completed event (shows that the
        # previews reach the caller while the upstream is still working).
        self.stream_gate: asyncio.Event | None = None
        # When set, every OpenAI-form generation gets this body (a compatible server's
        # own JSON, right or wrong) with HTTP 200, sent in pieces of `raw_piece` bytes
        # each written on its own, with no Content-Length.
        self.raw_reply: bytes | None = None
        self.raw_piece = 1 << 16

    @property
    def openai_base(self) -> str:
        return f"{self.base_url}/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/images/generations", self._openai)
        app.router.add_post("/openai/deployments/{deployment}/images/generations", self._azure)
        app.router.add_post("/openai/v1/images/generations", self._azure_v1)
        app.router.add_get("/files/{name}", self._file)
        # Edits and variations (multipart): tests/fakes/openai_edits.py.
        self.edit_routes(app)

    # -- OpenAI ---------------------------------------------------------------------------

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        fault = await self.take_fault(request)
        denied = self._openai_auth(request, fault)
        if denied is not None:
            return denied
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        if self.raw_reply is not None:
            return await self._raw(request, self.raw_reply)
        model = body.get("model", "dall-e-2")
        family = family_of(model) or ("generic" if model in self.compatible_models else None)
        if family is None:
            return openai_error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        return self._generate(body, family, fault, azure=False) or self._reply(
            body, family, fault, azure=False
        )

    def _openai_auth(self, request: web.Request, fault: Fault | None) -> web.Response | None:
        if self.openai_key is None and fault is not Fault.AUTH:
            return None
        sent = request.headers.get("Authorization", "")
        if not sent.startswith("Bearer ") and fault is not Fault.AUTH:
            return openai_error(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
                "or as the password field (with blank username) if you're accessing the API "
                "from your browser and are prompted for a username and password. You can obtain "
                "an API key from https://platform.openai.com/account/api-keys.",
            )
        key = sent.removeprefix("Bearer ")
        if key != self.openai_key or fault is Fault.AUTH:
            masked = f"{key[:3]}{'*' * max(len(key) - 7, 0)}{key[-4:]}" if len(key) > 7 else "***"
            return openai_error(
                401,
                f"Incorrect API key provided: {masked}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        return None

    # -- Azure ----------------------------------------------------------------------------

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        fault = await self.take_fault(request)
        denied = self._azure_auth(request, fault)
        if denied is not None:
            return denied
        version = request.query.get("api-version")
        if not version:
            return azure_error(404, "404", "Resource not found")
        if not API_VERSION.fullmatch(version):
            return azure_error(400, "BadRequest", "API version not supported")
        model = self.deployments.get(request.match_info["deployment"])
        if model is None:
            return _deployment_not_found()
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        return self._azure_generate(body, model, fault)

    async def _azure_v1(self, request: web.Request) -> web.StreamResponse:
        fault = await self.take_fault(request)
        denied = self._azure_auth(request, fault)
        if denied is not None:
            return denied
        if request.query.get("api-version", "v1") not in ("v1", "preview", "latest"):
            return azure_error(400, "BadRequest", "API version not supported")
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        if "model" not in body:
            return _missing("model")
        model = self.deployments.get(body["model"])
        if model is None:
            return _deployment_not_found()
        return self._azure_generate(body, model, fault)

    def _azure_auth(self, request: web.Request, fault: Fault | None) -> web.Response | None:
        if request.headers.get("api-key") == self.azure_key and fault is not Fault.AUTH:
            return None
        return azure_error(
            401,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
            "provide a valid key for an active subscription and use a correct regional API "
            "endpoint for your resource.",
        )

    def _azure_generate(
        self, body: dict[str, Any], model: str, fault: Fault | None
    ) -> web.Response:
        family = family_of(model) or "generic"
        # The deployment decides the model; a body `model` (v1 form) named the deployment.
        body = {**body, "model": model}
        return self._generate(body, family, fault, azure=True) or self._reply(
            body, family, fault, azure=True
        )

    # -- shared ---------------------------------------------------------------------------

    def _generate(
        self, body: dict[str, Any], family: str, fault: Fault | None, *, azure: bool
    ) -> web.Response | None:
        """The error this request gets, if any: validation first, then the injected fault."""
        invalid = _validate(body, family)
        if invalid is not None:
            return invalid
        echo = f" ({self.echo_in_errors})" if self.echo_in_errors else ""
        if fault is Fault.SERVER_ERROR:
            if azure:
                return azure_error(
                    500,
                    "InternalServerError",
                    "The server had an error processing your request. Sorry about that! You "
                    f"can retry your request.{echo}",
                )
            return openai_error(
                500,
                "The server had an error while processing your request. Sorry about that!" + echo,
                type_="server_error",
            )
        if fault is Fault.RATE_LIMITED:
            retry = {"Retry-After": str(self.retry_after)}
            if azure:
                return azure_error(
                    429,
                    "429",
                    "Requests to the ImageGenerations_Create Operation under Azure OpenAI API "
                    "have exceeded call rate limit of your current OpenAI S0 pricing tier. "
                    f"Please retry after {self.retry_after} seconds.",
                    headers=retry,
                )
            return openai_error(
                429,
                f"Rate limit reached for {body['model']} on images per minute (IPM): Limit 5, "
                f"Used 5, Requested 1. Please try again in {self.retry_after}s.",
                type_="requests",
                code="rate_limit_exceeded",
                headers=retry,
            )
        if fault is Fault.BAD_REQUEST:
            return openai_error(
                400,
                f"Invalid value for 'size': '{body.get('size')}' is not supported for this "
                f"request.{echo}",
                param="size",
                code="invalid_value",
            )
        if fault is Fault.SAFETY:
            return _safety(family, azure, echo)
        if fault is Fault.MALFORMED:
            return web.Response(
                text='{"created": 1700000000, "data": [{"b64_json": "iVBORw0KGgo',
                content_type="application/json",
            )
        return None

    def _reply(
        self, body: dict[str, Any], family: str, fault: Fault | None, *, azure: bool
    ) -> web.Response:
        n = int(body.get("n", 1)) + (2 if fault is Fault.EXTRA_IMAGES else 0)
        wants_url = family != "gpt-image" and (
            self.url_only or body.get("response_format", "url") == "url"
        )
        fmt = body.get("output_format", "png") if family == "gpt-image" else "png"
        data = []
        for index in range(n):
            blob = image_bytes(FORMATS[fmt], seed=index + 1)
            item: dict[str, Any] = {}
            if fault is Fault.URL_OUTSIDE:
                item["url"] = OUTSIDE_URL
            elif fault is Fault.URL_METADATA:
                item["url"] = METADATA_URL
            elif fault is Fault.OVERSIZE:
                item["url"] = f"{self.base_url}/files/oversize.png"
            elif wants_url:
                item["url"] = self.host(blob, fmt)
            else:
                item["b64_json"] = _b64(blob)
            if family == "dall-e-3":
                item["revised_prompt"] = f"A detailed rendering of: {body['prompt']}"
            if azure and family != "gpt-image":
                item["content_filter_results"] = content_filter_results()
                item["prompt_filter_results"] = content_filter_results()
            data.append(item)
        if family == "gpt-image" and body.get("stream"):
            return web.Response(body=self._events(body, fmt), content_type="text/event-stream")
        reply: dict[str, Any] = {"created": int(time.time()), "data": data}
        if family == "gpt-image":
            quality = body.get("quality", "auto")
            reply.update(
                background=body.get("background", "auto").replace("auto", "opaque"),
                output_format=fmt,
                quality=quality.replace("auto", "medium"),
                size=body.get("size", "auto").replace("auto", "1024x1024"),
                usage=self.usage_override or _usage(body["prompt"], OUTPUT_TOKENS[quality] * n),
            )
        return web.json_response(reply)

    async def _events(self, body: dict[str, Any], fmt: str) -> AsyncIterator[bytes]:
        """OpenAI's image stream: previews, then the completed image (or this fake's end)."""
        quality = body.get("quality", "auto")
        fields = {
            "created_at": int(time.time()),
            "size": body.get("size", "auto").replace("auto", "1024x1024"),
            "quality": quality.replace("auto", "medium"),
            "background": body.get("background", "auto").replace("auto", "opaque"),
            "output_format": fmt,
        }
        for index in range(int(body.get("partial_images", 0))):
            blob = image_bytes(FORMATS[fmt], seed=100 + index)
            yield _sse(
                "image_generation.partial_image",
                b64_json=_b64(blob),
                **fields,
                partial_image_index=index,
            )
        if self.stream_gate is not None:
            await self.stream_gate.wait()
        if self.stream_end == "cut":
            raise ConnectionResetError("the fake drops the stream")
        if self.stream_end == "error":
            yield _sse(
                "error",
                error={
                    "message": "The server had an error while processing your request.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                },
            )
            return
        usage = self.usage_override or _usage(body["prompt"], OUTPUT_TOKENS[quality])
        blob = image_bytes(FORMATS[fmt], seed=1)
        yield _sse("image_generation.completed", b64_json=_b64(blob), **fields, usage=usage)

    async def _raw(self, request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(body), self.raw_piece):
            await response.write(body[start : start + self.raw_piece])
            await asyncio.sleep(0)  # one piece at a time on the wire, as far as it goes
        await response.write_eof()
        return response

    def host(self, blob: bytes, fmt: str = "png") -> str:
        """The URL at which this server hands out `blob`."""
        name = f"img-{next(self._names)}.{fmt}"
        self.files[name] = blob
        return f"{'' if self.relative_urls else self.base_url}/files/{name}"

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "oversize.png":
            return web.Response(
                body=image_bytes() + b"\0" * self.oversize_bytes, content_type="image/png"
            )
        if name not in self.files:
            raise web.HTTPNotFound()
        ctype = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
        return web.Response(body=self.files[name], content_type=ctype[name.rsplit(".", 1)[1]])


def _sse(kind: str, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, **fields})
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def _usage(prompt: str, output_tokens: int) -> dict[str, Any]:
    text = max(len(prompt) // 4, 1)
    return {
        "input_tokens": text,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
        "output_tokens": output_tokens,
        "total_tokens": text + output_tokens,
    }


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return openai_error(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)",
        )
    return body


def _missing(param: str) -> web.Response:
    return openai_error(
        400,
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def _deployment_not_found() -> web.Response:
    return azure_error(
        404,
        "DeploymentNotFound",
        "The API deployment for this resource does not exist. If you created the deployment "
        "within the last 5 minutes, please wait a moment and try again.",
    )


def _validate(body: dict[str, Any], family: str) -> web.Response | None:
    rules = FAMILIES[family]
    for name in body:
        if name not in rules["fields"]:
            return openai_error(
                400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
            )
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return _missing("prompt")
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= rules["n_max"]:
        return openai_error(
            400,
            f"Invalid 'n': integer out of range. Expected a value from 1 to {rules['n_max']}, "
            f"but got {n} instead.",
            param="n",
            code="integer_above_max_value",
        )
    for param, allowed in (("size", rules["sizes"]), ("quality", rules["qualities"])):
        value = body.get(param)
        if value is not None and allowed and value not in allowed:
            return openai_error(
                400,
                f"Invalid value: '{value}'. Supported values are: "
                + ", ".join(f"'{a}'" for a in allowed)
                + ".",
                param=param,
                code="invalid_value",
            )
    choices = {
        "response_format": ("url", "b64_json"),
        "style": ("vivid", "natural"),
        "output_format": tuple(FORMATS),
        "background": ("transparent", "opaque", "auto"),
        "moderation": ("low", "auto"),
    }
    for param, allowed in choices.items():
        if param in body and body[param] not in allowed:
            return openai_error(
                400,
                f"Invalid value: '{body[param]}'. Supported values are: "
                + ", ".join(f"'{a}'" for a in allowed)
                + ".",
                param=param,
                code="invalid_value",
            )
    return None


def _safety(family: str, azure: bool, echo: str) -> web.Response:
    if family == "gpt-image":
        return openai_error(
            400,
            "Your request was rejected by the safety system. If you believe this is an error, "
            "contact us at help.openai.com and include the request ID "
            f"req_0123456789abcdef. safety_violations=[violence].{echo}",
            type_="image_generation_user_error",
            code="moderation_blocked",
            moderation_details={"moderation_stage": "input", "categories": ["violence"]},
        )
    if azure:
        error = {
            "code": "content_policy_violation",
            "message": "Your request was rejected as a result of our safety system. Your prompt "
            f"may contain text that is not allowed by our safety system.{echo}",
            "param": None,
            "type": "invalid_request_error",
            "inner_error": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_results": content_filter_results("violence"),
            },
        }
        return web.json_response({"error": error}, status=400)
    return openai_error(
        400,
        "Your request was rejected as a result of our safety system. Your prompt may contain "
        f"text that is not allowed by our safety system.{echo}",
        code="content_policy_violation",
    )


def image_call(
    model_id: str,
    upstream_model: str | None = None,
    *,
    n: int = 1,
    request_id: str = "req-test-1",
    family: str = "",
    **fields: Any,
) -> UpstreamCall:
    """An UpstreamCall as the dispatcher makes it, for catalog model `model_id` of `family`
    (empty: the adapter goes by the names)."""
    spec = ModelSpec(
        id=model_id,
        provider="test",
        upstream_model=upstream_model or model_id,
        sizes=("1024x1024",),
        default_size="1024x1024",
        qualities=("auto",),
        default_quality="auto",
        prices={},
        n_max=10,
        family=family,
    )
    values: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "n": n,
        "size": "1024x1024",
        "quality": "auto",
        "response_format": "b64_json",
        "output_format": "png",
    }
    values.update(fields)
    request = ImageRequest(model=spec, **values)
    return UpstreamCall(request, upstream_model or model_id, n, request_id)
