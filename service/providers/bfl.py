"""Black Forest Labs (kind `bfl`): FLUX models, one image per job, submit then poll.

`POST {base}/v1/{model}` with header `x-key` answers `{id, polling_url}`; the
adapter polls exactly that URL (after checking its host: it is upstream input
and our key goes with it) until the job is Ready, then downloads
`result.sample`, a signed URL that expires in minutes, through the safe
downloader. Moderated jobs are safety refusals. BFL has no cancel call: a
cancelled poll loop simply stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from service.errors import ContentPolicy, ImagegateError, UpstreamError, UpstreamRejected
from service.providers.base import (
    AdapterDeps,
    Downloader,
    Provider,
    ProviderResult,
    ProviderSettings,
    UpstreamCall,
)
from service.providers.download import HostPolicy
from service.providers.http import (
    credential,
    read_body,
    scrub,
    status_error,
    upstream_errors,
)
from service.providers.jobs import (
    aspect_ratio,
    fetch_images,
    followable,
    json_object,
    poll_delays,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.bfl.ai"
DEFAULT_ENV = "BFL_API_KEY"
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "9:21")
MODERATED = ("Request Moderated", "Content Moderated")
FAILED = ("Error", "Failed", "Task not found")
# BFL's body fields, as our request's parameter names.
PARAMS = {
    "width": "size",
    "height": "size",
    "aspect_ratio": "size",
    "output_format": "output_format",
}


class BflProvider:
    kind = "bfl"

    def __init__(self, settings: ProviderSettings, deps: AdapterDeps, key: str) -> None:
        self.id = settings.id
        self._url = (settings.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._key = key
        self._http = deps.http
        self._download: Downloader = deps.download
        self._hosts = HostPolicy(settings.download_hosts)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)

    def max_n(self, upstream_model: str) -> int:
        return 1

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        request = call.request
        body: dict[str, Any] = {"prompt": request.prompt, "output_format": request.output_format}
        if _takes_ratio(call.upstream_model):
            ratio = aspect_ratio(request.size, ASPECT_RATIOS)
            if ratio is not None:
                body["aspect_ratio"] = ratio
        else:
            body["width"], body["height"] = request.width, request.height
        job = await self._call("POST", f"{self._url}/v1/{quote(call.upstream_model)}", body)
        poll_url = followable(job.get("polling_url"), self._url, self._hosts, self.id)
        log.debug("%s: job %s submitted", self.id, job.get("id"))
        for delay in poll_delays():
            await asyncio.sleep(delay)
            state = await self._call("GET", poll_url)
            status = state.get("status")
            if status == "Ready":
                result = state.get("result")
                sample = result.get("sample") if isinstance(result, dict) else None
                images = await fetch_images(self._download, [sample], self.id)
                return ProviderResult(images=images)
            if status in MODERATED:
                raise ContentPolicy(
                    f"The upstream provider '{self.id}' refused the prompt ({status}"
                    f"{_details(state, self._key)})."
                )
            if status in FAILED:
                raise UpstreamError(
                    f"The upstream provider '{self.id}' failed the job ({status}"
                    f"{_details(state, self._key)})."
                )
        raise AssertionError("poll_delays never ends")

    async def _call(self, method: str, url: str, body: Any = None) -> dict[str, Any]:
        headers = {"x-key": self._key, "Accept": "application/json"}
        async with (
            upstream_errors(self.id),
            self._http.request(
                method, url, json=body, headers=headers, timeout=self._timeout
            ) as response,
        ):
            raw = await read_body(response, self.id)
            status, reply_headers = response.status, response.headers
        reply = json_object(raw)
        if status != 200:
            raise self._failure(status, reply_headers, reply or {})
        if reply is None:
            raise UpstreamError(f"The upstream provider '{self.id}' sent a reply that is not JSON.")
        return reply

    def _failure(
        self, status: int, headers: Mapping[str, str], reply: dict[str, Any]
    ) -> ImagegateError:
        detail = reply.get("detail")
        field = ""
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            # FastAPI validation: [{"loc": ["body", "width"], "msg": ...}, ...]
            loc = detail[0].get("loc")
            field = str(loc[-1]) if isinstance(loc, list) and loc else ""
            text = "; ".join(str(d.get("msg", "")) for d in detail if isinstance(d, dict))
        else:
            text = str(detail or "")
        text = scrub(text, [self._key])
        error = status_error(self.id, status, headers, text)
        if error is not None:
            return error
        return UpstreamRejected(
            f"The upstream provider '{self.id}' refused the request: {text or f'HTTP {status}'}",
            param=PARAMS.get(field, "prompt"),
        )

    async def aclose(self) -> None:
        return None


def _takes_ratio(model: str) -> bool:
    # Ultra and Kontext models are sized by aspect ratio; the others by width and height.
    return model.endswith("-ultra") or model.startswith("flux-kontext")


def _details(state: dict[str, Any], key: str) -> str:
    details = state.get("details")
    return f": {scrub(str(details), [key])}" if details else ""


def create(settings: ProviderSettings, deps: AdapterDeps) -> Provider:
    key = credential(deps.env, settings.api_key_env or DEFAULT_ENV)
    return BflProvider(settings, deps, key)
