"""Fake Stability AI v2beta Stable Image API: `POST /v2beta/stable-image/generate/{endpoint}`.

Speaks the documented wire format: `Authorization: Bearer`, a multipart form
(`prompt`, `negative_prompt`, `aspect_ratio`, `seed`, `output_format`, and
`model` for sd3), `Accept: application/json` (`{"image", "finish_reason",
"seed"}`) or `image/*` (raw bytes). Errors are `{"id", "name", "errors": [...]}`.
"""

from __future__ import annotations

import secrets

from aiohttp import web

from tests.fakes.base import FakeUpstream, Fault, image_bytes
from tests.fakes.outputs import CONTENT_TYPES, PIL_FORMATS

ASPECT_RATIOS = {"16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21"}
COMMON_FIELDS = {"prompt", "negative_prompt", "aspect_ratio", "seed", "output_format"}
FIELDS = {
    "core": COMMON_FIELDS | {"style_preset"},
    "ultra": COMMON_FIELDS,
    "sd3": COMMON_FIELDS | {"model", "mode", "cfg_scale"},
}
FORMATS = {
    "core": {"png", "jpeg", "webp"},
    "ultra": {"png", "jpeg", "webp"},
    "sd3": {"png", "jpeg"},
}
SD3_MODELS = {"sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash"}
MODERATION_TEXT = (
    "Your request was flagged by our content moderation system, as a result your request "
    "was denied and you were not charged."
)


class FakeStability(FakeUpstream):
    # Fault.SAFETY answers 403 content_moderation ("moderation") or a 200 whose
    # finish_reason is CONTENT_FILTERED ("filtered").
    safety = "moderation"
    retry_after = "7"
    # A careless upstream that quotes our credential back in its 500 error text.
    echo_credential = False

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        # Every image answered, in order (a delivered image must be one of these).
        self.served: list[bytes] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v2beta/stable-image/generate/{endpoint}", self._generate)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        fault = await self.take_fault(request)
        endpoint = request.match_info["endpoint"]
        if endpoint not in FIELDS:
            return error(404, "not_found", f"{request.path}: not found")
        if fault is Fault.AUTH or request.headers.get("Authorization") != f"Bearer {self.key}":
            return error(401, "unauthorized", "authorization: invalid or missing header value")
        if not request.headers.get("Content-Type", "").startswith("multipart/form-data"):
            return error(400, "bad_request", "content-type: must be multipart/form-data")
        accept = request.headers.get("Accept", "")
        if accept not in ("application/json", "image/*"):
            return error(400, "bad_request", "accept: must be image/* or application/json")
        form = self.seen(request).form
        problem = validate(endpoint, form)
        if problem:
            return error(400, "bad_request", problem)
        if fault is Fault.SERVER_ERROR:
            quoted = request.headers["Authorization"] if self.echo_credential else ""
            return error(500, "internal_error", f"An unexpected server error occurred. {quoted}")
        if fault is Fault.RATE_LIMITED:
            return error(
                429,
                "rate_limit_exceeded",
                "You have exceeded the rate limit of 150 requests within a 10 second period.",
                headers={"Retry-After": self.retry_after},
            )
        if fault is Fault.BAD_REQUEST:
            return error(400, "bad_request", "aspect_ratio: is not supported for this request")
        if fault is Fault.SAFETY and self.safety == "moderation":
            return error(403, "content_moderation", MODERATION_TEXT)
        if fault is Fault.MALFORMED:
            return web.Response(text='{"image": "iVBORw0KGgo', content_type="application/json")
        fmt = form.get("output_format", "png")
        data = image_bytes(PIL_FORMATS[fmt], seed=len(self.requests))
        finish = "CONTENT_FILTERED" if fault is Fault.SAFETY else "SUCCESS"
        self.served.append(data)
        seed = int(form.get("seed") or secrets.randbelow(4294967294))
        if accept == "image/*":
            return web.Response(
                body=data,
                content_type=CONTENT_TYPES[fmt],
                headers={"finish-reason": finish, "seed": str(seed)},
            )
        return web.json_response(
            {"image": self.b64(0, data), "finish_reason": finish, "seed": seed}
        )


def validate(endpoint: str, form: dict[str, str]) -> str:
    """The first problem Stability would report for this form, as "field: message"."""
    unknown = sorted(set(form) - FIELDS[endpoint])
    if unknown:
        return f"{unknown[0]}: is not a recognised field"
    if not form.get("prompt", "").strip():
        return "prompt: cannot be empty"
    if len(form["prompt"]) > 10000:
        return "prompt: must be at most 10000 characters"
    if form.get("aspect_ratio", "1:1") not in ASPECT_RATIOS:
        return f"aspect_ratio: must be one of {', '.join(sorted(ASPECT_RATIOS))}"
    if form.get("output_format", "png") not in FORMATS[endpoint]:
        return f"output_format: must be one of {', '.join(sorted(FORMATS[endpoint]))}"
    if endpoint == "sd3" and form.get("model", "sd3.5-large") not in SD3_MODELS:
        return f"model: must be one of {', '.join(sorted(SD3_MODELS))}"
    if "seed" in form and not (form["seed"].isdigit() and int(form["seed"]) <= 4294967294):
        return "seed: must be an integer from 0 to 4294967294"
    return ""


def error(
    status: int, name: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"id": secrets.token_hex(16), "name": name, "errors": [message]},
        status=status,
        headers=headers,
    )
