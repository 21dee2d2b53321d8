"""Fake Black Forest Labs API: `POST /v1/{model}` then poll the returned `polling_url`.

Speaks the documented wire format: header `x-key`, a JSON body (`prompt`,
`width`/`height`, or `aspect_ratio` for ultra and kontext models, `seed`,
`output_format`), a reply `{"id", "polling_url"}`, and polls answering
`{"id", "status", "result": {"sample": signed URL}}` with status Pending,
Ready, Error, Request Moderated, Content Moderated or Task not found. Errors
are FastAPI's `{"detail": ...}` (422 lists `{"loc", "msg", "type"}`). The
sample is served by the fake itself under /files/.

Faults are taken by the submission; those about the result (safety, a poll
that never finishes, bad or oversize sample URLs) then shape the job's polls.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeUpstream, Fault
from tests.fakes.outputs import OutputFiles

SIZED = {"flux-pro-1.1", "flux-dev", "flux-pro"}
RATIOED = {"flux-pro-1.1-ultra", "flux-kontext-pro", "flux-kontext-max"}
FIELDS = {
    "prompt",
    "width",
    "height",
    "aspect_ratio",
    "seed",
    "output_format",
    "safety_tolerance",
    "prompt_upsampling",
    "raw",
    "steps",
    "guidance",
    "webhook_url",
    "webhook_secret",
}
JOB_FAULTS = {Fault.SAFETY, Fault.POLL_FOREVER, Fault.URL_OUTSIDE, Fault.URL_METADATA}
JOB_FAULTS |= {Fault.OVERSIZE}


@dataclass
class Job:
    id: str
    body: dict[str, Any]
    fault: Fault | None
    polls: int = 0
    sample: str = ""


class FakeBfl(FakeUpstream):
    # Polls answered Pending before a job is Ready.
    pending_polls = 1
    # Status a SAFETY job ends in ("Request Moderated" or "Content Moderated").
    moderation = "Content Moderated"
    # Set to "Error" or "Failed" to make every job end that way.
    final_status = ""
    # Where polling_url points (default: this fake); a test may point it elsewhere.
    polling_base = ""
    retry_after = "3"
    # A careless upstream that quotes our credential back in its 500 error text.
    echo_credential = False

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.jobs: dict[str, Job] = {}
        self.outputs = OutputFiles()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/get_result", self._poll)
        app.router.add_post("/v1/{model}", self._submit)
        self.outputs.add_routes(app)

    def polls(self) -> int:
        return sum(1 for seen in self.requests if seen.path == "/v1/get_result")

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        fault = await self.take_fault(request)
        model = request.match_info["model"]
        if model not in SIZED | RATIOED:
            return web.json_response({"detail": "Not Found"}, status=404)
        if fault is Fault.AUTH or request.headers.get("x-key") != self.key:
            return web.json_response(
                {"detail": "Not authenticated - Invalid Authentication"}, status=401
            )
        body = self.seen(request).json
        problem = validate(model, body)
        if problem:
            return invalid(*problem)
        if fault is Fault.SERVER_ERROR:
            quoted = f" (x-key {self.key})" if self.echo_credential else ""
            return web.json_response({"detail": f"Internal Server Error{quoted}"}, status=500)
        if fault is Fault.RATE_LIMITED:
            return web.json_response(
                {"detail": "You have exceeded the number of active tasks (24)."},
                status=429,
                headers={"Retry-After": self.retry_after},
            )
        if fault is Fault.BAD_REQUEST:
            return invalid("width", "Input should be a multiple of 32")
        if fault is Fault.MALFORMED:
            return web.Response(text="<html>upstream gateway</html>", content_type="text/html")
        job = Job(secrets.token_hex(8), body, fault if fault in JOB_FAULTS else None)
        self.jobs[job.id] = job
        base = self.polling_base or self.base_url
        return web.json_response({"id": job.id, "polling_url": f"{base}/v1/get_result?id={job.id}"})

    async def _poll(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("x-key") != self.key:
            return web.json_response(
                {"detail": "Not authenticated - Invalid Authentication"}, status=401
            )
        job = self.jobs.get(request.query.get("id", ""))
        if job is None:
            return web.json_response({"id": request.query.get("id"), "status": "Task not found"})
        job.polls += 1
        if job.fault is Fault.POLL_FOREVER or job.polls <= self.pending_polls:
            return web.json_response(
                {"id": job.id, "status": "Pending", "result": None, "progress": 0.4}
            )
        if job.fault is Fault.SAFETY:
            return web.json_response(
                {
                    "id": job.id,
                    "status": self.moderation,
                    "result": None,
                    "details": {"Moderation Reasons": ["Derivative Works Filter"]},
                }
            )
        if self.final_status:
            return web.json_response(
                {"id": job.id, "status": self.final_status, "result": None, "details": None}
            )
        if not job.sample:
            fmt = job.body.get("output_format", "jpeg")
            job.sample = self.outputs.url(self.base_url, fmt, job.fault, seed=len(self.jobs))
            # Signed like BFL's delivery URLs.
            job.sample += f"?se=2030-01-01T00%3A00%3A00Z&sig={secrets.token_urlsafe(12)}"
        return web.json_response(
            {
                "id": job.id,
                "status": "Ready",
                "result": {"sample": job.sample, "prompt": job.body["prompt"], "seed": 42},
                "progress": None,
            }
        )


def validate(model: str, body: Any) -> tuple[str, str] | None:
    """The first (field, message) FastAPI would report for this body, or None."""
    if not isinstance(body, dict):
        return ("body", "Input should be a valid dictionary")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        return (unknown[0], "Extra inputs are not permitted")
    if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        return ("prompt", "Field required")
    if body.get("output_format", "jpeg") not in ("jpeg", "png"):
        return ("output_format", "Input should be 'jpeg' or 'png'")
    if model in RATIOED:
        if "width" in body or "height" in body:
            return ("width", "Extra inputs are not permitted")
        ratio = body.get("aspect_ratio", "16:9")
        match = re.fullmatch(r"(\d+):(\d+)", str(ratio))
        if not match or not 9 / 21 <= int(match[1]) / int(match[2]) <= 21 / 9:
            return ("aspect_ratio", "Aspect ratio must be between 21:9 and 9:21")
        return None
    if "aspect_ratio" in body:
        return ("aspect_ratio", "Extra inputs are not permitted")
    for side in ("width", "height"):
        value = body.get(side, 1024)
        if not isinstance(value, int) or not 256 <= value <= 1440 or value % 32:
            return (side, "Input should be a multiple of 32 between 256 and 1440")
    return None


def invalid(field: str, message: str) -> web.Response:
    detail = [{"loc": ["body", field], "msg": message, "type": "value_error"}]
    return web.json_response({"detail": detail}, status=422)
