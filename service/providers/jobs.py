"""What the ratio-taking and job-running adapters share (Stability, BFL, Replicate).

Aspect ratios: these providers take a ratio, not a size, so a size maps to the
nearest ratio the provider lists. Jobs: BFL and Replicate answer a submission
with a URL to poll; that URL is upstream input, and our credential goes with
every poll, so it is followed only to the provider's own host or to a host the
catalog lists for its downloads. Polls come at a bounded pace until the job
ends or the dispatcher cancels the call at its deadline.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Sequence
from typing import Any

from yarl import URL

from service.errors import UpstreamError
from service.providers.base import Downloader, GeneratedImage
from service.providers.download import HostPolicy
from service.providers.http import decode_image_b64
from service.providers.json_split import SplitJson, loads

# First poll soon (fast models finish in a second or two), then back off to a steady pace.
POLL_FIRST_S = 0.25
POLL_MAX_S = 2.0
POLL_GROWTH = 1.5


def json_object(body: bytes | SplitJson) -> dict[str, Any] | None:
    """The reply as a JSON object, or None for anything else (error bodies are best effort)."""
    try:
        value = loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def poll_delays() -> Iterator[float]:
    """Seconds to wait before each poll: growing, never above POLL_MAX_S, never ending."""
    delay = POLL_FIRST_S
    while True:
        yield delay
        delay = min(delay * POLL_GROWTH, POLL_MAX_S)


def aspect_ratio(size: str, ratios: Sequence[str]) -> str | None:
    """The ratio in `ratios` nearest to a "WxH" size (1792x1024 -> 16:9); None if not WxH."""
    try:
        width, height = (int(part) for part in size.split("x"))
    except ValueError:
        return None
    if width <= 0 or height <= 0:
        return None
    wanted = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = ratio.split(":")
        return abs(math.log(int(w) / int(h)) - wanted)

    return min(ratios, key=distance)


def followable(url: object, base_url: str, hosts: HostPolicy, provider_id: str) -> str:
    """An upstream-given URL we may send our credential to, or UpstreamError.

    Allowed: the base URL's own host (never downgraded from https), or a host
    listed in download_hosts over https (plain http only for one listed exactly,
    as for downloads).
    """
    if not isinstance(url, str) or not url:
        raise UpstreamError(f"The upstream provider '{provider_id}' sent no job URL to poll.")
    try:
        target, base = URL(url), URL(base_url)
    except (TypeError, ValueError):
        raise UpstreamError(
            f"The upstream provider '{provider_id}' sent a job URL that is not a URL."
        ) from None
    host = (target.host or "").lower()
    if target.scheme in ("http", "https") and host:
        if host == (base.host or "").lower() and (
            target.scheme == base.scheme or target.scheme == "https"
        ):
            return url
        if hosts.allows_host(host) and (target.scheme == "https" or hosts.listed_exactly(host)):
            return url
    raise UpstreamError(
        f"The upstream provider '{provider_id}' sent a job URL on a host it may not use "
        f"({host or 'none'})."
    )


async def fetch_images(
    download: Downloader, urls: Sequence[object], provider_id: str
) -> list[GeneratedImage]:
    """The images at `urls`, fetched in parallel through the safe downloader.

    A `data:` URL (Replicate may inline small outputs) is decoded instead of fetched.
    """

    async def one(url: object) -> GeneratedImage:
        if not isinstance(url, str) or not url:
            raise UpstreamError(f"The upstream provider '{provider_id}' sent an empty image URL.")
        if url.startswith("data:"):
            data, content_type = await asyncio.to_thread(_data_url, url, provider_id)
        else:
            data, content_type = await download.fetch(url)
        return GeneratedImage(data, content_type)

    # A TaskGroup: one refused URL cancels the other downloads at once. Its
    # ExceptionGroup is unwrapped: callers expect the first UpstreamError itself.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(url)) for url in urls]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def _data_url(url: str, provider_id: str) -> tuple[bytes, str]:
    head, _, payload = url.partition(",")
    if not head.endswith(";base64"):
        raise UpstreamError(f"The upstream provider '{provider_id}' sent a data URL not in base64.")
    return decode_image_b64(payload, provider_id)
