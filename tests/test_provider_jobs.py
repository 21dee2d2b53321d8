"""Shared pieces of the ratio-taking and job-running adapters, and the fakes' multipart record."""

from __future__ import annotations

import itertools

import aiohttp
import pytest
from aiohttp import web

from service.errors import UpstreamError
from service.providers import bfl, jobs, replicate, stability
from service.providers.download import HostPolicy
from tests.fakes.base import FakeUpstream


@pytest.mark.parametrize(
    ("size", "ratio"),
    [
        ("1024x1024", "1:1"),
        ("1792x1024", "16:9"),
        ("1024x1792", "9:16"),
        ("1536x1024", "3:2"),
        ("1024x1536", "2:3"),
        ("512x512", "1:1"),
        ("auto", None),
    ],
)
def test_size_to_aspect_ratio(size: str, ratio: str | None) -> None:
    for ratios in (stability.ASPECT_RATIOS, bfl.ASPECT_RATIOS, replicate.ASPECT_RATIOS):
        assert jobs.aspect_ratio(size, ratios) == ratio


def test_poll_delays_grow_to_a_bound_and_never_end() -> None:
    delays = list(itertools.islice(jobs.poll_delays(), 50))
    assert delays[0] == jobs.POLL_FIRST_S
    assert delays == sorted(delays)
    assert delays[-1] == jobs.POLL_MAX_S


BASE = "https://api.bfl.ai"
HOSTS = HostPolicy(["*.bfl.ai", "127.0.0.1"])


@pytest.mark.parametrize(
    "url",
    [
        "https://api.bfl.ai/v1/get_result?id=1",
        "https://api.us1.bfl.ai/v1/get_result?id=1",
        "http://127.0.0.1:8123/v1/get_result?id=1",  # listed exactly: http allowed
    ],
)
def test_followable_urls(url: str) -> None:
    assert jobs.followable(url, BASE, HOSTS, "bfl") == url


@pytest.mark.parametrize(
    "url",
    [
        "http://api.bfl.ai/v1/get_result?id=1",  # downgraded from https
        "http://api.us1.bfl.ai/v1/get_result",  # wildcard hosts are https only
        "https://169.254.169.254/latest/meta-data/",
        "https://bfl.ai.evil.example/v1/get_result",
        "ftp://api.bfl.ai/x",
        "/v1/get_result?id=1",
        "",
        None,
        42,
    ],
)
def test_unfollowable_urls(url: object) -> None:
    with pytest.raises(UpstreamError, match="'bfl'"):
        jobs.followable(url, BASE, HOSTS, "bfl")


class _Echo(FakeUpstream):
    def routes(self, app: web.Application) -> None:
        async def echo(request: web.Request) -> web.Response:
            return web.json_response(self.seen(request).form)

        app.router.add_post("/echo", echo)


async def test_fake_records_multipart_forms() -> None:
    # request.post() after request.read() finds no multipart boundary; the record must not.
    fake = _Echo()
    await fake.start()
    try:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("prompt", "un phare, été")
        form.add_field("image", b"\x89PNG...", filename="in.png", content_type="image/png")
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{fake.base_url}/echo", data=form) as response,
        ):
            assert response.status == 200
            echoed = await response.json()
    finally:
        await fake.stop()
    expected = {"prompt": "un phare, été", "image": "<file>"}
    assert echoed == expected
    assert fake.requests[0].form == expected
