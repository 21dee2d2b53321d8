"""The BFL adapter against the fake BFL API: submit, poll the returned URL, download."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator

import pytest
from PIL import Image

from service.errors import ContentPolicy, UpstreamError, UpstreamRejected
from service.providers import bfl, jobs
from service.providers.base import MissingCredentials, Provider, TokenUsage
from tests import adapter_kit as kit
from tests.fakes.base import Fault
from tests.fakes.bfl import FakeBfl

KEY = "bfl-FAKE-key-51d0e6a2"


@pytest.fixture
async def fake() -> AsyncIterator[FakeBfl]:
    server = FakeBfl(KEY)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def provider(fake: FakeBfl) -> AsyncIterator[Provider]:
    async with kit.adapter(bfl.create, "bfl", fake.base_url, {"BFL_API_KEY": KEY}) as made:
        yield made


@pytest.fixture(autouse=True)
def _no_credential_logged(caplog: pytest.LogCaptureFixture) -> object:
    caplog.set_level(logging.DEBUG)
    yield
    kit.assert_no_secret(KEY, caplog)


async def test_submit_poll_and_download(fake: FakeBfl, provider: Provider) -> None:
    fake.pending_polls = 2
    result = await provider.generate(
        kit.call("flux-pro-1.1", prompt="a fox in snow", size="1024x768", output_format="png")
    )
    submit, *polls, download = fake.requests
    assert (submit.method, submit.path) == ("POST", "/v1/flux-pro-1.1")
    assert submit.headers["x-key"] == KEY
    assert "Authorization" not in submit.headers
    assert submit.json == {
        "prompt": "a fox in snow",
        "output_format": "png",
        "width": 1024,
        "height": 768,
    }
    # Two Pending answers, then Ready: three polls of exactly the returned URL, with the key.
    assert [(p.method, p.path, set(p.query)) for p in polls] == [
        ("GET", "/v1/get_result", {"id"})
    ] * 3
    assert all(p.headers["x-key"] == KEY for p in polls)
    # The signed sample is downloaded without our key.
    assert download.path.startswith("/files/") and "sig" in download.query
    assert "x-key" not in download.headers
    [image] = result.images
    assert image.content_type == "image/png"
    assert Image.open(io.BytesIO(image.data)).format == "PNG"
    assert result.usage == TokenUsage()


@pytest.mark.parametrize(
    ("model", "size", "ratio"),
    [("flux-pro-1.1-ultra", "1792x1024", "16:9"), ("flux-kontext-pro", "1024x1536", "2:3")],
)
async def test_ultra_and_kontext_take_an_aspect_ratio(
    fake: FakeBfl, provider: Provider, model: str, size: str, ratio: str
) -> None:
    result = await provider.generate(kit.call(model, size=size, output_format="jpeg"))
    body = fake.requests[0].json
    assert body["aspect_ratio"] == ratio
    assert "width" not in body and "height" not in body
    assert result.images[0].content_type == "image/jpeg"


def test_one_image_per_job(provider: Provider) -> None:
    assert provider.max_n("flux-pro-1.1") == 1


@pytest.mark.parametrize(
    ("fault", "retryable", "words"),
    [
        (Fault.SERVER_ERROR, True, "HTTP 500"),
        (Fault.STALL, True, "timed out"),
        (Fault.RESET, True, "could not be reached"),
        (Fault.MALFORMED, False, "not JSON"),
        (Fault.AUTH, False, "refused the gateway's credentials"),
        (Fault.URL_OUTSIDE, False, "host not allowed for downloads (localhost)"),
        (Fault.URL_METADATA, False, "not allowed for downloads (169.254.169.254)"),
        (Fault.OVERSIZE, False, "too large"),
    ],
)
async def test_upstream_failures(
    fake: FakeBfl, provider: Provider, fault: Fault, retryable: bool, words: str
) -> None:
    fake.inject(fault)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(kit.call("flux-dev"))
    assert caught.value.retryable is retryable
    assert words in caught.value.message
    assert "'bfl'" in caught.value.message
    assert KEY not in caught.value.message


async def test_refused_urls_are_never_fetched(fake: FakeBfl, provider: Provider) -> None:
    fake.inject(Fault.URL_OUTSIDE)
    with pytest.raises(UpstreamError):
        await provider.generate(kit.call("flux-dev"))
    assert fake.outputs.fetched == []


async def test_credential_quoted_by_the_upstream_is_scrubbed(
    fake: FakeBfl, provider: Provider
) -> None:
    fake.echo_credential = True
    fake.inject(Fault.SERVER_ERROR)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(kit.call("flux-dev"))
    assert "[redacted]" in caught.value.message
    assert KEY not in caught.value.message


async def test_rate_limit_passes_retry_after(fake: FakeBfl, provider: Provider) -> None:
    fake.inject(Fault.RATE_LIMITED)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(kit.call("flux-dev"))
    assert caught.value.retryable and caught.value.retry_after_s == 3.0


@pytest.mark.parametrize("status", ["Content Moderated", "Request Moderated"])
async def test_moderated_jobs_are_safety_refusals(
    fake: FakeBfl, provider: Provider, status: str
) -> None:
    fake.moderation = status
    fake.inject(Fault.SAFETY)
    with pytest.raises(ContentPolicy) as caught:
        await provider.generate(kit.call("flux-dev"))
    assert status in caught.value.message
    assert "Derivative Works Filter" in caught.value.message


@pytest.mark.parametrize("status", ["Error", "Failed"])
async def test_failed_jobs_fail_over(fake: FakeBfl, provider: Provider, status: str) -> None:
    fake.final_status = status
    with pytest.raises(UpstreamError, match=f"failed the job \\({status}") as caught:
        await provider.generate(kit.call("flux-dev"))
    assert not caught.value.retryable


async def test_validation_error_names_our_parameter(provider: Provider) -> None:
    # flux-pro-1.1 takes at most 1440 pixels a side: BFL's 422 names `width`.
    with pytest.raises(UpstreamRejected) as caught:
        await provider.generate(kit.call("flux-pro-1.1", size="1792x1024"))
    assert caught.value.param == "size"
    assert "between 256 and 1440" in caught.value.message


async def test_poll_that_never_finishes_stops_when_cancelled(
    fake: FakeBfl, provider: Provider
) -> None:
    fake.inject(Fault.POLL_FOREVER)
    task = asyncio.create_task(provider.generate(kit.call("flux-dev")))
    await kit.until(lambda: fake.polls() >= 2)  # really polling, again and again
    task.cancel()  # what the dispatcher does at the deadline
    with pytest.raises(asyncio.CancelledError):
        await task
    polled = fake.polls()
    await asyncio.sleep(jobs.POLL_MAX_S * 1.5)  # longer than any poll interval
    assert fake.polls() == polled


@pytest.mark.parametrize(
    "polling_base",
    ["http://169.254.169.254", "http://localhost:1", "https://api.bfl.ai.evil.example"],
)
async def test_polling_url_on_a_foreign_host_is_refused(
    fake: FakeBfl, provider: Provider, polling_base: str
) -> None:
    fake.polling_base = polling_base
    with pytest.raises(UpstreamError, match="job URL on a host it may not use") as caught:
        await provider.generate(kit.call("flux-dev"))
    assert not caught.value.retryable
    assert fake.polls() == 0


async def test_polling_url_on_a_download_host_is_followed(fake: FakeBfl) -> None:
    # BFL's polling URLs live on regional hosts (api.us1.bfl.ai), listed as download hosts;
    # here the submission goes to "localhost" and the polls to the listed 127.0.0.1.
    base = fake.base_url.replace("127.0.0.1", "localhost")
    fake.polling_base = fake.base_url
    async with kit.adapter(bfl.create, "bfl", base, {"BFL_API_KEY": KEY}) as provider:
        result = await provider.generate(kit.call("flux-dev"))
    assert result.images and fake.polls() == 2


async def test_missing_credential_names_the_variable(fake: FakeBfl) -> None:
    settings = bfl.ProviderSettings(id="bfl", kind="bfl", base_url=fake.base_url)
    deps = bfl.AdapterDeps(http=None, download=None, env={})  # type: ignore[arg-type]
    with pytest.raises(MissingCredentials, match="BFL_API_KEY"):
        bfl.create(settings, deps)
