"""Safe downloads of provider-returned URLs: allowlist, address checks, redirects, caps, decode."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from PIL import Image

from service.errors import UpstreamError
from service.providers.download import HostPolicy, SafeDownloader, _CheckingResolver


def png(size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


PNG = png()


@pytest.fixture
async def origin() -> AsyncIterator[str]:
    """An image host on 127.0.0.1 with a few misbehaving paths."""

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html></html>", content_type="text/html")

    async def fake_png(request: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG\r\n\x1a\n" + b"\0" * 64, content_type="image/png")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=PNG + b"\0" * 4096, content_type="image/png")

    async def to_metadata(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    async def to_image(request: web.Request) -> web.Response:
        raise web.HTTPFound("/image.png")

    app = web.Application()
    app.router.add_get("/image.png", image)
    app.router.add_get("/page", html)
    app.router.add_get("/fake.png", fake_png)
    app.router.add_get("/big.png", big)
    app.router.add_get("/redirect-metadata", to_metadata)
    app.router.add_get("/redirect-image", to_image)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def downloader() -> AsyncIterator[SafeDownloader]:
    d = SafeDownloader("fake", ["127.0.0.1", "*.blob.core.windows.net"], max_bytes=2048)
    yield d
    await d.aclose()


async def test_listed_host_is_fetched_and_typed_by_its_bytes(
    downloader: SafeDownloader, origin: str
) -> None:
    assert await downloader.fetch(f"{origin}/image.png") == (PNG, "image/png")
    assert await downloader.fetch(f"{origin}/redirect-image") == (PNG, "image/png")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://169.254.169.254/latest/meta-data/", "not allowed"),
        ("https://evil.example.com/x.png", "not allowed"),
        ("ftp://127.0.0.1/x.png", r"http\(s\)"),
        ("not a url", r"http\(s\)"),
        # Wildcards never admit plain http.
        ("http://acct.blob.core.windows.net/x.png", "not https"),
    ],
)
async def test_refused_before_any_connection(
    downloader: SafeDownloader, url: str, why: str
) -> None:
    with pytest.raises(UpstreamError, match=why) as caught:
        await downloader.fetch(url)
    assert "'fake'" in caught.value.message


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/page", "not an image"),
        ("/fake.png", "not a decodable image"),
        ("/big.png", "too large"),
        ("/redirect-metadata", "not allowed"),
        ("/missing", "HTTP 404"),
    ],
)
async def test_bad_replies_are_upstream_errors(
    downloader: SafeDownloader, origin: str, path: str, why: str
) -> None:
    with pytest.raises(UpstreamError, match=why):
        await downloader.fetch(origin + path)


async def test_resolved_private_address_refused_unless_host_listed_exactly() -> None:
    # "localhost" matches the wildcard policy only through resolution: the
    # address it resolves to (loopback) is what gets refused.
    refusing = _CheckingResolver(HostPolicy(["*.localhost", "*.example"]))
    with pytest.raises(OSError, match="may not use"):
        await refusing.resolve("localhost", 80)
    await refusing.close()
    listed = _CheckingResolver(HostPolicy(["localhost"]))
    assert {r["host"] for r in await listed.resolve("localhost", 80)} & {"127.0.0.1", "::1"}
    await listed.close()


def test_address_classes() -> None:
    policy = HostPolicy(["*.example.com"])
    for address in (
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "127.0.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
    ):
        assert not policy.allows_address("img.example.com", address), address
    assert policy.allows_address("img.example.com", "93.184.216.34")
    assert policy.allows_host("a.b.example.com") and not policy.allows_host("example.com")
