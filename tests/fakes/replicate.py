"""Fake Replicate HTTP API: official-model predictions, `Prefer: wait`, polling, cancel.

Speaks the documented wire format: `Authorization: Bearer`, `POST
/v1/models/{owner}/{name}/predictions` with `{"input": {...}}` answering 201
with a prediction `{id, model, status, input, output, error, urls{get,
cancel, stream, web}, ...}`; `GET /v1/predictions/{id}`; `POST
/v1/predictions/{id}/cancel`. With `Prefer: wait[=n]` the reply waits for
the prediction to finish (for at most `wait_s` here); without it a
prediction starts as "starting" and is polled. Errors are problem details
`{"title", "detail", "status"}` (422 adds `invalid_fields`). Outputs are
URLs served by the fake under /files/.

Faults are taken by the creation; those about the outcome (safety, never
finishing, bad or oversize output URLs, extra outputs) shape the prediction.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeUpstream, Fault
from tests.fakes.outputs import OutputFiles

RATIOS = {"1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"}
COMMON = {"prompt", "aspect_ratio", "output_format", "output_quality", "seed"}
# Each model's inputs, and whether it answers a list of outputs (num_outputs) or one.
MODELS: dict[str, tuple[set[str], bool]] = {
    "black-forest-labs/flux-schnell": (
        COMMON
        | {"num_outputs", "go_fast", "megapixels", "num_inference_steps"}
        | {"disable_safety_checker"},
        True,
    ),
    "black-forest-labs/flux-dev": (COMMON | {"num_outputs", "guidance", "go_fast"}, True),
    "black-forest-labs/flux-1.1-pro": (
        COMMON | {"width", "height", "safety_tolerance", "prompt_upsampling"},
        False,
    ),
}
OUTCOME_FAULTS = {
    Fault.SAFETY,
    Fault.POLL_FOREVER,
    Fault.URL_OUTSIDE,
    Fault.URL_METADATA,
    Fault.OVERSIZE,
    Fault.EXTRA_IMAGES,
}
NSFW_ERROR = "NSFW content detected. Try running it again, or try a different prompt."


@dataclass
class Prediction:
    id: str
    model: str
    input: dict[str, Any]
    fault: Fault | None
    polls: int = 0
    status: str = "starting"
    output: Any = None
    error: str | None = None


class FakeReplicate(FakeUpstream):
    # Polls answered "processing" before a prediction ends; 0 = it ends within `Prefer: wait`.
    processing_polls = 0
    # How long `Prefer: wait` holds the reply at most (Replicate: up to 60 s).
    wait_s = 0.2
    # Set to make every prediction fail with this error text.
    fail_with = ""
    # Outputs inlined as data: URLs instead of files to fetch.
    inline_outputs = False
    # Where urls.get and urls.cancel point (default: this fake); a test may point them elsewhere.
    urls_base = ""
    retry_after = "5"
    # A careless upstream that quotes our credential back in its 500 error text.
    echo_credential = False

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.predictions: dict[str, Prediction] = {}
        self.canceled: list[str] = []
        self.outputs = OutputFiles()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/models/{owner}/{name}/predictions", self._create)
        app.router.add_get("/v1/predictions/{id}", self._get)
        app.router.add_post("/v1/predictions/{id}/cancel", self._cancel)
        self.outputs.add_routes(app)

    def polls(self) -> int:
        return sum(
            1 for seen in self.requests if seen.method == "GET" and "/predictions/" in seen.path
        )

    async def _create(self, request: web.Request) -> web.StreamResponse:
        fault = await self.take_fault(request)
        model = f"{request.match_info['owner']}/{request.match_info['name']}"
        if fault is Fault.AUTH or not self._authorized(request):
            return problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        if model not in MODELS:
            return problem(404, "Not found", "The requested resource could not be found.")
        prefer = request.headers.get("Prefer", "")
        if prefer and not re.fullmatch(r"wait(=([1-9]|[1-5][0-9]|60))?", prefer):
            return problem(400, "Invalid Prefer header", f"Unsupported preference: {prefer}")
        body = self.seen(request).json
        invalid = validate(model, body)
        if invalid:
            return problem(
                422,
                "Input validation failed",
                f"- input.{invalid[0]}: {invalid[1]}",
                invalid_fields=[
                    {"type": "invalid", "field": f"input.{invalid[0]}", "description": invalid[1]}
                ],
            )
        if fault is Fault.SERVER_ERROR:
            quoted = request.headers["Authorization"] if self.echo_credential else ""
            return problem(500, "Internal Server Error", f"Something went wrong. {quoted}")
        if fault is Fault.RATE_LIMITED:
            return problem(
                429,
                "Request was throttled.",
                f"Request was throttled. Expected available in {self.retry_after} seconds.",
                headers={"Retry-After": self.retry_after},
            )
        if fault is Fault.BAD_REQUEST:
            return problem(
                422,
                "Input validation failed",
                "- input.aspect_ratio: aspect_ratio must be one of the following: 1:1, 16:9",
                invalid_fields=[
                    {
                        "type": "enum",
                        "field": "input.aspect_ratio",
                        "description": "aspect_ratio must be one of the following",
                    }
                ],
            )
        if fault is Fault.MALFORMED:
            return web.Response(
                status=201, text='{"id": "x", "status": "succe', content_type="application/json"
            )
        job = Prediction(
            secrets.token_hex(10), model, body["input"], fault if fault in OUTCOME_FAULTS else None
        )
        self.predictions[job.id] = job
        if prefer and self.processing_polls == 0:
            self._advance(job)
        elif prefer:
            # Held open like Replicate's sync mode, then answered still running.
            job.status = "processing"
            await asyncio.sleep(self.wait_s)
        return web.json_response(self._view(job), status=201)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        job = self.predictions.get(request.match_info["id"])
        if job is None:
            return problem(404, "Not found", "The requested resource could not be found.")
        if job.status not in ("succeeded", "failed", "canceled"):
            job.polls += 1
            if job.fault is not Fault.POLL_FOREVER and job.polls > self.processing_polls:
                self._advance(job)
            else:
                job.status = "processing"
        return web.json_response(self._view(job))

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        job = self.predictions.get(request.match_info["id"])
        if job is None:
            return problem(404, "Not found", "The requested resource could not be found.")
        self.canceled.append(job.id)
        if job.status not in ("succeeded", "failed"):
            job.status = "canceled"
        return web.json_response(self._view(job))

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.key}"

    def _advance(self, job: Prediction) -> None:
        """The prediction's outcome, decided by its fault."""
        if job.fault is Fault.POLL_FOREVER:
            job.status = "processing"
            return
        if job.fault is Fault.SAFETY or self.fail_with:
            job.status = "failed"
            job.error = NSFW_ERROR if job.fault is Fault.SAFETY else self.fail_with
            return
        multiple = MODELS[job.model][1]
        count = int(job.input.get("num_outputs", 1)) if multiple else 1
        if job.fault is Fault.EXTRA_IMAGES:
            count += 1
        fmt = job.input.get("output_format", "webp")
        urls = [self.outputs.url(self.base_url, fmt, job.fault, seed=i) for i in range(count)]
        if self.inline_outputs:
            urls = [self._inline(url) for url in urls]
        job.status, job.output = "succeeded", urls if multiple else urls[0]

    def _inline(self, url: str) -> str:
        data, content_type = self.outputs.files[url.rsplit("/", 1)[1]]
        return f"data:{content_type};base64,{base64.b64encode(data).decode()}"

    def _view(self, job: Prediction) -> dict[str, Any]:
        url = f"{self.urls_base or self.base_url}/v1/predictions/{job.id}"
        return {
            "id": job.id,
            "model": job.model,
            "version": "hidden",
            "input": job.input,
            "logs": "",
            "output": job.output,
            "data_removed": False,
            "error": job.error,
            "status": job.status,
            "created_at": "2025-01-01T00:00:00.000Z",
            "urls": {
                "get": url,
                "cancel": f"{url}/cancel",
                "stream": f"{self.base_url}/stream/{job.id}",
                "web": f"https://replicate.com/p/{job.id}",
            },
        }


def validate(model: str, body: Any) -> tuple[str, str] | None:
    """The first (field, message) Replicate's schema check would report, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return ("input", "input is required")
    given: dict[str, Any] = body["input"]
    fields, multiple = MODELS[model]
    unknown = sorted(set(given) - fields)
    if unknown:
        return (unknown[0], "Additional property is not allowed")
    if not isinstance(given.get("prompt"), str) or not given["prompt"].strip():
        return ("prompt", "prompt is required")
    if given.get("aspect_ratio", "1:1") not in RATIOS:
        return ("aspect_ratio", "aspect_ratio must be one of the following: " + ", ".join(RATIOS))
    if given.get("output_format", "webp") not in ("webp", "jpg", "png"):
        return ("output_format", "output_format must be one of the following: webp, jpg, png")
    quality = given.get("output_quality", 80)
    if not isinstance(quality, int) or not 0 <= quality <= 100:
        return ("output_quality", "Must be less than or equal to 100")
    outputs = given.get("num_outputs", 1)
    if multiple and (not isinstance(outputs, int) or not 1 <= outputs <= 4):
        return ("num_outputs", "Must be less than or equal to 4")
    return None


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    return web.json_response(
        {"title": title, "detail": detail, "status": status, **extra},
        status=status,
        headers=headers,
        content_type="application/problem+json",
    )
