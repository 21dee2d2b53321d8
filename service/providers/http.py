"""What every HTTP adapter shares: credentials, reading replies, and upstream failures as errors.

One classification for all providers, so that "retryable" means the same thing
everywhere: 408/429/5xx, connection errors and timeouts may be retried (429
with the upstream's Retry-After); 401/403 mean the gateway's own credentials
were refused and 402 that its account there is out of credit (never retried,
but the next route may work); any other 4xx is left to the adapter, which
knows whether its provider meant a safety refusal (ContentPolicy) or a bad
request (UpstreamRejected).

Messages name the provider id, never a credential: `scrub` removes the
credential from any upstream text before it can reach a caller or a log.
"""

from __future__ import annotations

import binascii
import contextlib
import email.utils
import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import aiohttp

from service import b64
from service.errors import UpstreamError
from service.providers.base import MissingCredentials

# Largest JSON reply read from an upstream: n=10 base64 images of a few MB each.
MAX_REPLY_BYTES = 128 * 1024 * 1024
# Longest upstream error text passed on to a caller.
MAX_MESSAGE_CHARS = 300
# Upper bound on a Retry-After we honour; a longer one is treated as "not now, fail over".
MAX_RETRY_AFTER_S = 120.0

IMAGE_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"WEBP", 8, "image/webp"),
)


def credential(env: Mapping[str, str], variable: str) -> str:
    """The credential in `variable`, or MissingCredentials naming the variable."""
    value = env.get(variable, "").strip()
    if not value:
        raise MissingCredentials(f"{variable} is not set")
    return value


@contextlib.asynccontextmanager
async def upstream_errors(provider_id: str) -> AsyncIterator[None]:
    """Transport failures (refused, reset, timed out, bad HTTP) as retryable UpstreamErrors."""
    try:
        yield
    except TimeoutError:
        raise UpstreamError(
            f"The upstream provider '{provider_id}' timed out.", retryable=True
        ) from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(
            f"The upstream provider '{provider_id}' could not be reached ({type(exc).__name__}).",
            retryable=True,
        ) from None


async def read_json(response: aiohttp.ClientResponse, provider_id: str) -> Any:
    """The reply's JSON, or a non-retryable UpstreamError for a body that is not JSON."""
    body = await read_body(response, provider_id)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise UpstreamError(
            f"The upstream provider '{provider_id}' sent a reply that is not JSON "
            f"(HTTP {response.status})."
        ) from None


async def read_body(
    response: aiohttp.ClientResponse, provider_id: str, limit: int = MAX_REPLY_BYTES
) -> bytes:
    """The whole body, refusing one over `limit` bytes without reading it all."""
    length = response.content_length
    if length is not None and length > limit:
        raise reply_too_large(provider_id)
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise reply_too_large(provider_id)
        chunks.append(chunk)
    return b"".join(chunks)


def reply_too_large(provider_id: str) -> UpstreamError:
    return UpstreamError(f"The upstream provider '{provider_id}' sent a reply too large.")


def status_error(
    provider_id: str, status: int, headers: Mapping[str, str], detail: str = ""
) -> UpstreamError | None:
    """The UpstreamError for a failing status that means the same for every provider.

    None for the other 4xx: the adapter decides between ContentPolicy and
    UpstreamRejected from its provider's error body.
    """
    if status in (401, 403):
        return UpstreamError(
            f"The upstream provider '{provider_id}' refused the gateway's credentials "
            f"(HTTP {status})."
        )
    if status == 402:
        # Our account at the provider is out of credit: not the caller's fault, and
        # retrying will not help, but another route may still work.
        return UpstreamError(
            f"The upstream provider '{provider_id}' refused the call: the account has no credit."
        )
    if status == 429 or status == 408 or status >= 500:
        suffix = f": {detail}" if detail else ""
        return UpstreamError(
            f"The upstream provider '{provider_id}' failed with HTTP {status}{suffix}",
            retryable=True,
            retry_after_s=retry_after(headers.get("Retry-After")),
        )
    return None


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), capped; None if absent."""
    if not value:
        return None
    value = value.strip()
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Upstream text made safe to show: credentials removed, one line, bounded length."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = " ".join(text.split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text


def decode_image_b64(value: object, provider_id: str) -> tuple[bytes, str]:
    """A base64 image from a JSON reply: its bytes and MIME type, or UpstreamError."""
    if not isinstance(value, str) or not value:
        raise UpstreamError(f"The upstream provider '{provider_id}' sent an image that is empty.")
    try:
        data = b64.decode(value)
    except (binascii.Error, ValueError):
        raise invalid_base64(provider_id) from None
    return data, image_type(data, provider_id)


def invalid_base64(provider_id: str) -> UpstreamError:
    return UpstreamError(
        f"The upstream provider '{provider_id}' sent an image that is not valid base64."
    )


def image_type(data: bytes, provider_id: str) -> str:
    """The MIME type by the bytes themselves (never by a name or header), or UpstreamError."""
    for magic, offset, content_type in IMAGE_MAGIC:
        if data[offset : offset + len(magic)] == magic and (
            content_type != "image/webp" or data[:4] == b"RIFF"
        ):
            return content_type
    raise UpstreamError(
        f"The upstream provider '{provider_id}' sent something that is not a PNG, JPEG or "
        "WebP image."
    )
