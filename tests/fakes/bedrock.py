"""Fake AWS Bedrock runtime: `POST /model/{modelId}/invoke`, SigV4 verified, AWS's errors.

The signature is recomputed with botocore from the fake's own credentials and
what actually arrived (method, raw path, query, the headers the client says
it signed, the body's hash, its X-Amz-Date), so a request altered after
signing, signed with another secret, or for another region or service is
refused as AWS refuses it: 403 with `x-amzn-ErrorType` InvalidSignatureException,
UnrecognizedClientException (unknown key or session token) or
MissingAuthenticationTokenException. Bodies are validated per family (Nova
Canvas / Titan, Stability) and refused with ValidationException messages.
"""

from __future__ import annotations

import datetime
import hmac
import json
import re
from collections import deque
from typing import Any

from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.fakes.base import FakeUpstream, Fault, image_bytes

NOVA_MODELS = (
    "amazon.nova-canvas-v1:0",
    "amazon.titan-image-generator-v2:0",
    "amazon.titan-image-generator-v1",
)
STABILITY_MODELS = (
    "stability.stable-image-core-v1:1",
    "stability.stable-image-ultra-v1:1",
    "stability.sd3-5-large-v1:0",
)
STABILITY_RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<signature>[0-9a-f]{64})$"
)
MAX_SKEW = datetime.timedelta(minutes=15)
INPUT_FILTER = (
    "This request has been blocked by our content filters. Our filters automatically "
    "flagged this prompt because it may conflict our AUP or AWS Responsible AI Policy. "
    "Please adjust your text prompt to submit a new request."
)
OUTPUT_FILTER = (
    "The generated image(s) have been blocked by our content filters. "
    "Please adjust your request and try again."
)
BLOCKED_WORD = "forbidden-subject"


def aws_error(status: int, kind: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"message": message},
        status=status,
        headers={
            "x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            **headers,
        },
    )


def malformed(problem: str) -> web.Response:
    return aws_error(
        400,
        "ValidationException",
        f"Malformed input request: {problem}, please reformat your input and try again.",
    )


class BedrockFake(FakeUpstream):
    def __init__(
        self, access_key: str, secret_key: str, session_token: str = "", region: str = "us-east-1"
    ) -> None:
        super().__init__()
        self.access_key = access_key
        self.secret_key = secret_key
        self.session_token = session_token
        self.region = region
        # Output images of the next reply that the content filter removes.
        self.filter_next = 0
        # (status, x-amzn-ErrorType, message) replies to play before any other.
        self.errors: deque[tuple[int, str, str]] = deque()
        # Retry-After of a 429 (end-to-end tests make it short).
        self.retry_after = "3"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/model/{model}/invoke", self._invoke)

    async def _invoke(self, request: web.Request) -> web.StreamResponse:
        fault = await self.take_fault(request)
        body = await request.read()
        refused = self._check_signature(request, body)
        if refused is not None:
            return refused
        if fault is Fault.AUTH:
            return aws_error(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        if self.errors:
            status, kind, message = self.errors.popleft()
            return aws_error(status, kind, message)
        if fault is Fault.SERVER_ERROR:
            return aws_error(
                500, "InternalServerException", "The server encountered an internal error."
            )
        if fault is Fault.RATE_LIMITED:
            # Bedrock itself sends no Retry-After; a proxy in front may, and it is honoured.
            return aws_error(
                429,
                "ThrottlingException",
                "Too many requests, please wait before trying again.",
                **{"Retry-After": self.retry_after},
            )
        if fault is Fault.MALFORMED:
            return web.Response(text='{"images": ["unterminated', content_type="application/json")
        model = request.match_info["model"]
        if model not in NOVA_MODELS + STABILITY_MODELS:
            return aws_error(
                400, "ValidationException", "The provided model identifier is invalid."
            )
        try:
            data = json.loads(body)
        except ValueError:
            return malformed("#: expected type: JSONObject")
        if model in NOVA_MODELS:
            return self._nova(data, fault)
        return self._stability(data, fault)

    def _nova(self, data: Any, fault: Fault | None) -> web.Response:
        problem = _nova_problem(data)
        if problem:
            return malformed(problem)
        if fault is Fault.BAD_REQUEST:
            return malformed("#/imageGenerationConfig/width: 4000 is not a multiple of 16")
        if fault is Fault.SAFETY or BLOCKED_WORD in data["textToImageParams"]["text"]:
            return aws_error(400, "ValidationException", INPUT_FILTER)
        count = data["imageGenerationConfig"]["numberOfImages"]
        count += 2 if fault is Fault.EXTRA_IMAGES else 0
        kept = max(count - self.filter_next, 0)
        error = OUTPUT_FILTER if kept < count else None
        self.filter_next = 0
        images = [self.b64(i, image_bytes(seed=i)) for i in range(kept)]
        return web.json_response({"images": images, "error": error})

    def _stability(self, data: Any, fault: Fault | None) -> web.Response:
        problem = _stability_problem(data)
        if problem:
            return malformed(problem)
        if fault is Fault.BAD_REQUEST:
            return malformed("#/prompt: expected maxLength: 10000")
        if fault is Fault.SAFETY or BLOCKED_WORD in data["prompt"]:
            return web.json_response({"finish_reasons": ["Filter reason: prompt"]})
        if self.filter_next:
            self.filter_next = 0
            return web.json_response(
                {"seeds": [1234], "finish_reasons": ["Filter reason: output image"], "images": []}
            )
        fmt = "JPEG" if data.get("output_format") == "jpeg" else "PNG"
        count = 3 if fault is Fault.EXTRA_IMAGES else 1
        images = [self.b64(i, image_bytes(fmt, seed=i)) for i in range(count)]
        return web.json_response(
            {
                "seeds": [1234 + i for i in range(count)],
                "finish_reasons": [None] * count,
                "images": images,
            }
        )

    def _check_signature(self, request: web.Request, body: bytes) -> web.Response | None:
        """None if the SigV4 signature is AWS-valid for our credentials, else AWS's 403."""
        header = request.headers.get("Authorization")
        if header is None:
            return aws_error(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        match = AUTH_RE.match(header)
        amz_date = request.headers.get("X-Amz-Date", "")
        if match is None or not amz_date:
            return aws_error(
                403,
                "IncompleteSignatureException",
                "Authorization header requires 'Credential', 'Signature', 'SignedHeaders' and "
                "'X-Amz-Date'.",
            )
        if (
            match["key"] != self.access_key
            or request.headers.get("X-Amz-Security-Token", "") != self.session_token
        ):
            return aws_error(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        if abs(datetime.datetime.now(datetime.UTC) - when) > MAX_SKEW:
            return aws_error(403, "InvalidSignatureException", "Signature expired.")
        signed = match["signed"].split(";")
        if "host" not in signed or match["date"] != amz_date[:8]:
            return aws_error(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided.",
            )
        # botocore recomputes it from exactly the headers the client claims to have signed.
        aws_request = AWSRequest(
            method=request.method,
            url=f"http://{request.host}{request.raw_path}",
            data=body,
            headers={name: request.headers.get(name, "") for name in signed},
        )
        aws_request.context["timestamp"] = amz_date
        credentials = Credentials(self.access_key, self.secret_key, self.session_token or None)
        signer = SigV4Auth(credentials, "bedrock", self.region)
        canonical = signer.canonical_request(aws_request)
        expected = signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)
        if (match["region"], match["service"]) != (
            self.region,
            "bedrock",
        ) or not hmac.compare_digest(expected, match["signature"]):
            return aws_error(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method. Consult the service "
                "documentation for details.",
            )
        return None


def _nova_problem(data: Any) -> str:
    if not isinstance(data, dict):
        return "#: expected type: JSONObject"
    extra = sorted(set(data) - {"taskType", "textToImageParams", "imageGenerationConfig"})
    if extra:
        return f"#: extraneous key [{extra[0]}] is not permitted"
    if data.get("taskType") != "TEXT_IMAGE":
        return "#/taskType: TEXT_IMAGE is the only task type served here"
    params = data.get("textToImageParams")
    if (
        not isinstance(params, dict)
        or not isinstance(params.get("text"), str)
        or not params["text"]
    ):
        return "#/textToImageParams: required key [text] not found"
    config = data.get("imageGenerationConfig", {})
    allowed = {"numberOfImages", "width", "height", "quality", "cfgScale", "seed"}
    extra = sorted(set(config) - allowed)
    if extra:
        return f"#/imageGenerationConfig: extraneous key [{extra[0]}] is not permitted"
    count = config.setdefault("numberOfImages", 1)
    if not isinstance(count, int) or not 1 <= count <= 5:
        return f"#/imageGenerationConfig/numberOfImages: {count} is not in range 1-5"
    for side in ("width", "height"):
        value = config.get(side, 1024)
        if not isinstance(value, int) or not 320 <= value <= 4096 or value % 16:
            return f"#/imageGenerationConfig/{side}: {value} is not valid"
    if config.get("quality", "standard") not in ("standard", "premium"):
        return f"#/imageGenerationConfig/quality: {config['quality']} is not a valid enum value"
    return ""


def _stability_problem(data: Any) -> str:
    if not isinstance(data, dict):
        return "#: expected type: JSONObject"
    extra = sorted(
        set(data) - {"prompt", "aspect_ratio", "output_format", "seed", "mode", "negative_prompt"}
    )
    if extra:
        return f"#: extraneous key [{extra[0]}] is not permitted"
    if not isinstance(data.get("prompt"), str) or not data["prompt"]:
        return "#: required key [prompt] not found"
    if data.get("mode", "text-to-image") != "text-to-image":
        return f"#/mode: {data['mode']} is not a valid enum value"
    if data.get("aspect_ratio", "1:1") not in STABILITY_RATIOS:
        return f"#/aspect_ratio: {data['aspect_ratio']} is not a valid enum value"
    if data.get("output_format", "png") not in ("png", "jpeg"):
        return f"#/output_format: {data['output_format']} is not a valid enum value"
    return ""
