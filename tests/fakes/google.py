"""Fake Google Imagen: the Gemini API and Vertex AI `:predict` routes, with Google's errors.

Gemini API: `POST /v1beta/models/{model}:predict`, header `x-goog-api-key`.
Vertex AI: `POST /v1/projects/{p}/locations/{l}/publishers/google/models/{model}:predict`,
`Authorization: Bearer`. A missing key is 403 PERMISSION_DENIED and a wrong one
400 INVALID_ARGUMENT with reason API_KEY_INVALID, as the Gemini API answers;
Vertex answers a bad token with 401 UNAUTHENTICATED. Bodies are validated as
the service does (sampleCount 1-4, known aspect ratios, no Vertex-only fields
on the Gemini API). A prompt containing BLOCKED_WORD is refused by the input
safety filter (400, Responsible-AI wording); `filter_next` output images of the
next reply are replaced by `raiFilteredReason` entries.

`POST /token` is Google's OAuth token endpoint for service-account credentials
(a JWT-bearer grant), so google-auth's application default credentials can be
pointed at the fake through a key file's `token_uri`.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeUpstream, Fault, image_bytes

MODELS = (
    "imagen-3.0-generate-002",
    "imagen-3.0-fast-generate-001",
    "imagen-4.0-generate-001",
    "imagen-4.0-ultra-generate-001",
    "imagen-4.0-fast-generate-001",
)
ASPECT_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")
PERSON_GENERATION = ("dont_allow", "allow_adult", "allow_all")
MIME_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
GEMINI_PARAMETERS = {
    "sampleCount",
    "aspectRatio",
    "personGeneration",
    "outputOptions",
    "includeRaiReason",
    "includeSafetyAttributes",
    "safetySetting",
    "imageSize",
    "sampleImageSize",
    "guidanceScale",
    "language",
}
VERTEX_PARAMETERS = GEMINI_PARAMETERS | {
    "negativePrompt",
    "seed",
    "addWatermark",
    "enhancePrompt",
    "storageUri",
}
BLOCKED_WORD = "forbidden-subject"
INPUT_REFUSAL = (
    "Image generation failed with the following error: The prompt could not be submitted. "
    "This prompt contains sensitive words that violate Google's Responsible AI practices. "
    "Try rephrasing the prompt. If you think this was an error, send feedback. "
    "Support codes: 42876398"
)
OUTPUT_REFUSAL = (
    "Your current safety filter threshold filtered out 1 generated images. You will not be "
    "charged for blocked images. Try rephrasing the prompt. If you think this was an error, "
    "send feedback. Support codes: 58061214"
)
RETRY_DELAY_S = 7
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def google_error(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=code)


class GoogleFake(FakeUpstream):
    """Both Google Imagen APIs; `api_key` for the Gemini API, `token` for Vertex."""

    def __init__(self, api_key: str, token: str, project: str = "proj-1") -> None:
        super().__init__()
        self.api_key = api_key
        self.token = token
        self.project = project
        self.filter_next = 0
        # Drop filtered images without a reason, as Imagen does when none was asked for.
        self.silent_filter = False
        # (status, google status, message, details) replies to play before any other.
        self.errors: deque[tuple[int, str, str, list[dict[str, Any]]]] = deque()
        self.revised_prompt = ""
        # Lifetime of the tokens /token hands out; google-auth refreshes 3m45s early.
        self.token_lifetime_s = 3600
        self.token_grants = 0
        # What a 429's RetryInfo asks for (end-to-end tests make it short).
        self.retry_delay_s: float = RETRY_DELAY_S

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{model}:predict", self._gemini)
        app.router.add_post(
            "/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:predict",
            self._vertex,
        )
        app.router.add_post("/token", self._token)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        assertion = str(form.get("assertion", ""))
        if form.get("grant_type") != JWT_GRANT or assertion.count(".") != 2:
            return web.json_response(
                {"error": "invalid_grant", "error_description": "Invalid JWT."}, status=400
            )
        self.token_grants += 1
        return web.json_response(
            {
                "access_token": self.token,
                "expires_in": self.token_lifetime_s,
                "token_type": "Bearer",
            }
        )

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        fault = await self.take_fault(request)
        key = request.headers.get("x-goog-api-key")
        if key is None:
            return google_error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if key != self.api_key or fault is Fault.AUTH:
            return self._bad_key()
        return await self._predict(request, fault, GEMINI_PARAMETERS, vertex=False)

    async def _vertex(self, request: web.Request) -> web.StreamResponse:
        fault = await self.take_fault(request)
        if request.headers.get("Authorization") != f"Bearer {self.token}" or fault is Fault.AUTH:
            return google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "ACCESS_TOKEN_TYPE_UNSUPPORTED",
                        "domain": "googleapis.com",
                    }
                ],
            )
        if request.match_info["project"] != self.project:
            return google_error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'aiplatform.endpoints.predict' denied on resource "
                f"'projects/{request.match_info['project']}' (or it may not exist).",
            )
        return await self._predict(request, fault, VERTEX_PARAMETERS, vertex=True)

    def _bad_key(self) -> web.Response:
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            ],
        )

    async def _predict(
        self, request: web.Request, fault: Fault | None, allowed: set[str], *, vertex: bool
    ) -> web.StreamResponse:
        if self.errors:
            status, google_status, message, details = self.errors.popleft()
            return google_error(status, google_status, message, details)
        if fault is Fault.SERVER_ERROR:
            return google_error(500, "INTERNAL", "Internal error encountered.")
        if fault is Fault.RATE_LIMITED:
            return google_error(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_"
                "base_model with base model: imagen-3.0-generate. Please submit a quota "
                "increase request.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{self.retry_delay_s}s",
                    }
                ],
            )
        if fault is Fault.MALFORMED:
            return web.Response(text="<html><body>502 Bad Gateway</body></html>", status=200)
        if fault is Fault.BAD_REQUEST:
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "Image generation failed with the following error: The prompt is too long.",
            )
        model = request.match_info["model"]
        if model not in MODELS:
            api = "v1" if vertex else "v1beta"
            return google_error(
                404,
                "NOT_FOUND",
                f"models/{model} is not found for API version {api}, or is not supported "
                "for predict. Call ListModels to see the list of available models and their "
                "supported methods.",
            )
        problem, prompt, parameters = _validate(await request.read(), allowed)
        if problem:
            return google_error(400, "INVALID_ARGUMENT", problem)
        if BLOCKED_WORD in prompt:
            return google_error(400, "INVALID_ARGUMENT", INPUT_REFUSAL)
        return self._reply(fault, parameters)

    def _reply(self, fault: Fault | None, parameters: dict[str, Any]) -> web.Response:
        count = parameters["sampleCount"]
        if fault is Fault.EXTRA_IMAGES:
            count += 2
        if fault is Fault.SAFETY:
            self.filter_next = count
        fmt = MIME_TYPES[parameters.get("outputOptions", {}).get("mimeType", "image/png")]
        predictions: list[dict[str, Any]] = []
        for index in range(count):
            if index < self.filter_next:
                # Dropped silently unless the caller asked for the reason.
                if parameters.get("includeRaiReason") and not self.silent_filter:
                    predictions.append({"raiFilteredReason": OUTPUT_REFUSAL})
                continue
            prediction = {
                "mimeType": f"image/{fmt.lower()}",
                "bytesBase64Encoded": self.b64(index, image_bytes(fmt, seed=index)),
            }
            if self.revised_prompt:
                prediction["prompt"] = self.revised_prompt
            predictions.append(prediction)
        self.filter_next = 0
        return web.json_response({"predictions": predictions} if predictions else {})


def _validate(body: bytes, allowed: set[str]) -> tuple[str, str, dict[str, Any]]:
    """Google's complaint about the body ("" if none), the prompt and the parameters."""
    try:
        data = json.loads(body)
    except ValueError:
        return "Invalid JSON payload received.", "", {}
    instances = data.get("instances") if isinstance(data, dict) else None
    if not isinstance(instances, list) or len(instances) != 1:
        return "Image generation failed: exactly one instance is expected.", "", {}
    prompt = instances[0].get("prompt") if isinstance(instances[0], dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        return "Image generation failed with the following error: prompt is empty.", "", {}
    parameters = data.get("parameters", {})
    if not isinstance(parameters, dict):
        return 'Invalid JSON payload received. Unknown name "parameters".', prompt, {}
    unknown = sorted(set(parameters) - allowed)
    if unknown:
        return f'Invalid JSON payload received. Unknown name "{unknown[0]}".', prompt, {}
    count = parameters.setdefault("sampleCount", 4)
    if not isinstance(count, int) or not 1 <= count <= 4:
        return "Number of images must be in the range [1, 4].", prompt, {}
    if parameters.get("aspectRatio", "1:1") not in ASPECT_RATIOS:
        return f"Unsupported aspect ratio: {parameters['aspectRatio']}", prompt, {}
    if parameters.get("personGeneration", "allow_adult") not in PERSON_GENERATION:
        return "Invalid personGeneration value.", prompt, {}
    output = parameters.get("outputOptions", {})
    if not isinstance(output, dict) or output.get("mimeType", "image/png") not in MIME_TYPES:
        return "Unsupported output mime type.", prompt, {}
    return "", prompt, parameters
