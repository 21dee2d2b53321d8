"""Building one real adapter against a fake upstream: a real aiohttp session, a real
SafeDownloader allowing the fake's 127.0.0.1, validated requests, and a check that no
credential reaches a log record."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable

import aiohttp
import pytest

from service.catalog import ModelSpec
from service.providers.base import AdapterDeps, Provider, ProviderSettings, UpstreamCall
from service.providers.download import SafeDownloader
from service.requests import ImageRequest

# Download cap in adapter tests: the fakes' oversize file announces far more.
MAX_DOWNLOAD_BYTES = 1024 * 1024
# Short, so a stalled upstream fails the test quickly; fakes answer in milliseconds.
TIMEOUT_S = 1.0

Factory = Callable[[ProviderSettings, AdapterDeps], Provider]


def request(
    *,
    prompt: str = "a lighthouse at dusk",
    family: str = "",
    size: str = "1024x1024",
    output_format: str = "png",
    n: int = 1,
    user: str = "",
    output_compression: int | None = None,
) -> ImageRequest:
    """A request as validate() would make it, for a model of the given catalog family."""
    model = ModelSpec(
        id="test-model",
        provider="test",
        upstream_model="unused",
        sizes=(size,),
        default_size=size,
        qualities=("standard",),
        default_quality="standard",
        prices={(size, "standard"): 40_000},
        n_max=10,
        family=family,
    )
    return ImageRequest(
        model=model,
        prompt=prompt,
        n=n,
        size=size,
        quality="standard",
        response_format="b64_json",
        output_format=output_format,
        output_compression=output_compression,
        user=user,
    )


def call(upstream_model: str, n: int = 1, **request_args: object) -> UpstreamCall:
    return UpstreamCall(
        request=request(n=n, **request_args),  # type: ignore[arg-type]
        upstream_model=upstream_model,
        n=n,
        request_id="req-test-1",
    )


@contextlib.asynccontextmanager
async def adapter(
    factory: Factory,
    kind: str,
    base_url: str,
    env: dict[str, str],
    *,
    provider_id: str = "",
    api_key_env: str = "",
    download_hosts: Iterable[str] = ("127.0.0.1",),
    timeout_s: float = TIMEOUT_S,
) -> AsyncIterator[Provider]:
    """The adapter made by its module's `create()`, as the registry would make it."""
    settings = ProviderSettings(
        id=provider_id or kind,
        kind=kind,
        base_url=base_url,
        api_key_env=api_key_env,
        timeout_s=timeout_s,
        download_hosts=tuple(download_hosts),
    )
    downloader = SafeDownloader(
        settings.id, settings.download_hosts, max_bytes=MAX_DOWNLOAD_BYTES, timeout_s=timeout_s
    )
    async with aiohttp.ClientSession() as http:
        provider = factory(settings, AdapterDeps(http=http, download=downloader, env=env))
        try:
            yield provider
        finally:
            await provider.aclose()
            await downloader.aclose()


def assert_no_secret(secret: str, caplog: pytest.LogCaptureFixture, *texts: object) -> None:
    """The secret is in no captured log record (message, args, exception) and no text given."""
    for record in caplog.records:
        rendered = logging.Formatter().format(record)
        assert secret not in rendered, f"credential in log record {record.name}"
        assert secret not in repr(record.args)
    for text in texts:
        assert secret not in str(text)


async def until(condition: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait for a condition a fake's record will meet; fail after limit_s, not forever."""
    # Polling a plain record: the fakes keep lists, not events, and this is test-only.
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
