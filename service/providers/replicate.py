"""Replicate (kind `replicate`): official models by `owner/name`, a prediction per call.

`POST {base}/v1/models/{owner}/{name}/predictions` with `Prefer: wait` holds
the request open up to 60 s; a prediction still running then is polled at
`urls.get` (host-checked: our token goes with it) until it succeeded, failed
or was cancelled. Outputs are short-lived URLs (or data URLs), fetched through
the safe downloader. If the call is cancelled or fails while the prediction
runs, the prediction is cancelled too (best effort, in the background), so
nobody pays for an image no one will collect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
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

DEFAULT_BASE_URL = "https://api.replicate.com"
DEFAULT_ENV = "REPLICATE_API_TOKEN"
# Models that take `num_outputs`, and their most per prediction; the others make one image.
MAX_OUTPUTS = {"black-forest-labs/flux-schnell": 4, "black-forest-labs/flux-dev": 4}
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "9:21")
# Replicate's FLUX models spell JPEG "jpg".
FORMATS = {"jpeg": "jpg"}
MAX_WAIT_S = 60
# How a failed prediction says its input or output was judged unsafe.
SAFETY = re.compile(r"nsfw|safety|sensitive|flagged|inappropriate|\(E005\)", re.IGNORECASE)
TERMINAL = ("succeeded", "failed", "canceled")
# Replicate's `input.*` field names, as our request's parameter names.
PARAMS = {
    "aspect_ratio": "size",
    "num_outputs": "n",
    "output_format": "output_format",
    "output_quality": "output_compression",
}
CANCEL_TIMEOUT_S = 10.0


class ReplicateProvider:
    kind = "replicate"

    def __init__(self, settings: ProviderSettings, deps: AdapterDeps, key: str) -> None:
        self.id = settings.id
        self._url = (settings.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._key = key
        self._http = deps.http
        self._download: Downloader = deps.download
        self._hosts = HostPolicy(settings.download_hosts)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        # Leave a second of the request's own timeout for the reply to arrive.
        self._wait_s = max(1, min(MAX_WAIT_S, int(settings.timeout_s) - 1))
        self._cancels: set[asyncio.Task[None]] = set()

    def max_n(self, upstream_model: str) -> int:
        return MAX_OUTPUTS.get(upstream_model, 1)

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        request = call.request
        given: dict[str, Any] = {
            "prompt": request.prompt,
            "output_format": FORMATS.get(request.output_format, request.output_format),
        }
        ratio = aspect_ratio(request.size, ASPECT_RATIOS)
        if ratio is not None:
            given["aspect_ratio"] = ratio
        if call.upstream_model in MAX_OUTPUTS:
            given["num_outputs"] = call.n
        if request.output_compression is not None:
            given["output_quality"] = request.output_compression
        path = "/".join(quote(part, safe="") for part in call.upstream_model.split("/", 1))
        prediction = await self._call(
            "POST",
            f"{self._url}/v1/models/{path}/predictions",
            {"input": given},
            prefer=f"wait={self._wait_s}",
        )
        log.debug("%s: prediction %s %s", self.id, prediction.get("id"), prediction.get("status"))
        prediction = await self._finished(prediction)
        output = prediction.get("output")
        urls = output if isinstance(output, list) else [output]
        if not urls:
            raise UpstreamError(f"The upstream provider '{self.id}' returned no images.")
        # Extra outputs are not fetched: the caller asked for call.n.
        return ProviderResult(images=await fetch_images(self._download, urls[: call.n], self.id))

    async def _finished(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """The prediction once it succeeded; errors for failed or cancelled ones.

        Whatever stops the polling (the dispatcher's deadline cancelling this
        call, a poll that fails) cancels a prediction still running.
        """
        delays = poll_delays()
        try:
            while True:
                status = prediction.get("status")
                if status == "succeeded":
                    return prediction
                if status == "failed":
                    raise self._failed(prediction.get("error"))
                if status == "canceled":
                    raise UpstreamError(
                        f"The upstream provider '{self.id}' cancelled the prediction."
                    )
                await asyncio.sleep(next(delays))
                prediction = await self._call("GET", self._job_url(prediction, "get"))
        except BaseException:
            self._cancel_soon(prediction)
            raise

    def _failed(self, error: object) -> ImagegateError:
        text = scrub(str(error or "no reason given"), [self._key])
        if SAFETY.search(text):
            return ContentPolicy(f"The upstream provider '{self.id}' refused the prompt: {text}")
        return UpstreamError(f"The upstream provider '{self.id}' failed the prediction: {text}")

    def _job_url(self, prediction: dict[str, Any], which: str) -> str:
        urls = prediction.get("urls")
        url = urls.get(which) if isinstance(urls, dict) else None
        return followable(url, self._url, self._hosts, self.id)

    def _cancel_soon(self, prediction: dict[str, Any]) -> None:
        """Cancel a prediction still running, in a task of its own (this call may be cancelled)."""
        if prediction.get("status") in TERMINAL:
            return
        try:
            url = self._job_url(prediction, "cancel")
        except UpstreamError:
            return
        task = asyncio.create_task(self._cancel(url))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, url: str) -> None:
        # Best effort: a failed cancel costs money at the provider, never the caller's answer.
        with contextlib.suppress(Exception):
            async with (
                asyncio.timeout(CANCEL_TIMEOUT_S),
                self._http.post(url, headers=self._headers()) as response,
            ):
                log.debug("%s: cancel answered HTTP %s", self.id, response.status)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}

    async def _call(
        self, method: str, url: str, body: Any = None, *, prefer: str = ""
    ) -> dict[str, Any]:
        headers = self._headers()
        if prefer:
            headers["Prefer"] = prefer
        async with (
            upstream_errors(self.id),
            self._http.request(
                method, url, json=body, headers=headers, timeout=self._timeout
            ) as response,
        ):
            raw = await read_body(response, self.id)
            status, reply_headers = response.status, response.headers
        reply = json_object(raw)
        if status not in (200, 201, 202):
            raise self._failure(status, reply_headers, reply or {})
        if reply is None:
            raise UpstreamError(f"The upstream provider '{self.id}' sent a reply that is not JSON.")
        return reply

    def _failure(
        self, status: int, headers: Mapping[str, str], reply: dict[str, Any]
    ) -> ImagegateError:
        # Problem details: {"title", "detail", "status", "invalid_fields": [{"field", ...}]}
        text = scrub(str(reply.get("detail") or reply.get("title") or ""), [self._key])
        error = status_error(self.id, status, headers, text)
        if error is not None:
            return error
        return UpstreamRejected(
            f"The upstream provider '{self.id}' refused the request: {text or f'HTTP {status}'}",
            param=_param(reply.get("invalid_fields")),
        )

    async def aclose(self) -> None:
        # Let cancels already sent finish; each is bounded by CANCEL_TIMEOUT_S.
        if self._cancels:
            await asyncio.gather(*self._cancels, return_exceptions=True)


def _param(fields: object) -> str:
    if isinstance(fields, list):
        for entry in fields:
            name = str(entry.get("field", "")) if isinstance(entry, dict) else ""
            name = name.removeprefix("input.")
            if name in PARAMS:
                return PARAMS[name]
    return "prompt"


def create(settings: ProviderSettings, deps: AdapterDeps) -> Provider:
    key = credential(deps.env, settings.api_key_env or DEFAULT_ENV)
    return ReplicateProvider(settings, deps, key)
