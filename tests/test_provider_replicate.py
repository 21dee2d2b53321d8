"""The Replicate adapter against the fake Replicate API: Prefer: wait, polling, cancel, outputs."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator

import pytest
from PIL import Image

from service.errors import ContentPolicy, UpstreamError, UpstreamRejected
from service.providers import jobs, replicate
from service.providers.base import MissingCredentials, Provider, TokenUsage
from tests import adapter_kit as kit
from tests.fakes.base import Fault
from tests.fakes.replicate import NSFW_ERROR, FakeReplicate

KEY = "r8_FAKE_token_0d4c1b77e2"
SCHNELL = "black-forest-labs/flux-schnell"
PRO = "black-forest-labs/flux-1.1-pro"


@pytest.fixture
async def fake() -> AsyncIterator[FakeReplicate]:
    server = FakeReplicate(KEY)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def provider(fake: FakeReplicate) -> AsyncIterator[Provider]:
    env = {"REPLICATE_API_TOKEN": KEY}
    async with kit.adapter(replicate.create, "replicate", fake.base_url, env) as made:
        yield made


@pytest.fixture(autouse=True)
def _no_credential_logged(caplog: pytest.LogCaptureFixture) -> object:
    caplog.set_level(logging.DEBUG)
    yield
    kit.assert_no_secret(KEY, caplog)


async def test_sync_prediction_on_the_wire(fake: FakeReplicate, provider: Provider) -> None:
    result = await provider.generate(
        kit.call(
            SCHNELL,
            n=3,
            prompt="a paper boat",
            size="1536x1024",
            output_format="jpeg",
            output_compression=70,
        )
    )
    create, *downloads = fake.requests
    assert (create.method, create.path) == (
        "POST",
        "/v1/models/black-forest-labs/flux-schnell/predictions",
    )
    assert create.headers["Authorization"] == f"Bearer {KEY}"
    assert create.headers["Prefer"] == "wait=1"  # timeout_s 1.0 in these tests: never above it
    assert create.json == {
        "input": {
            "prompt": "a paper boat",
            "output_format": "jpg",
            "aspect_ratio": "3:2",
            "num_outputs": 3,
            "output_quality": 70,
        }
    }
    # Finished within Prefer: wait: no poll, three downloads without our token.
    assert [d.path.startswith("/files/") for d in downloads] == [True] * 3
    assert all("Authorization" not in d.headers for d in downloads)
    assert [i.content_type for i in result.images] == ["image/jpeg"] * 3
    assert len({i.data for i in result.images}) == 3
    assert Image.open(io.BytesIO(result.images[0].data)).format == "JPEG"
    assert result.usage == TokenUsage()


async def test_single_output_model_gets_no_num_outputs(
    fake: FakeReplicate, provider: Provider
) -> None:
    result = await provider.generate(kit.call(PRO, size="1024x1024"))
    assert fake.requests[0].json["input"] == {
        "prompt": "a lighthouse at dusk",
        "output_format": "png",
        "aspect_ratio": "1:1",
    }
    [image] = result.images
    assert image.content_type == "image/png"


def test_max_n_per_model(provider: Provider) -> None:
    assert provider.max_n(SCHNELL) == 4
    assert provider.max_n(PRO) == 1


async def test_still_running_after_wait_is_polled(fake: FakeReplicate, provider: Provider) -> None:
    fake.processing_polls = 2
    result = await provider.generate(kit.call(SCHNELL, output_format="webp"))
    polls = [r for r in fake.requests if r.method == "GET" and "/predictions/" in r.path]
    assert len(polls) == 3
    assert all(p.headers["Authorization"] == f"Bearer {KEY}" for p in polls)
    assert result.images[0].content_type == "image/webp"
    assert fake.canceled == []


async def test_data_url_outputs_are_decoded(fake: FakeReplicate, provider: Provider) -> None:
    fake.inline_outputs = True
    result = await provider.generate(kit.call(SCHNELL, n=2))
    assert [i.content_type for i in result.images] == ["image/png"] * 2
    assert fake.outputs.fetched == []


async def test_extra_outputs_are_neither_fetched_nor_fatal(
    fake: FakeReplicate, provider: Provider
) -> None:
    fake.inject(Fault.EXTRA_IMAGES)
    result = await provider.generate(kit.call(SCHNELL, n=2))
    assert len(result.images) == 2
    assert len(fake.outputs.fetched) == 2  # the third output was never downloaded


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
    fake: FakeReplicate, provider: Provider, fault: Fault, retryable: bool, words: str
) -> None:
    fake.inject(fault)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(kit.call(SCHNELL, n=2))
    assert caught.value.retryable is retryable
    assert words in caught.value.message
    assert "'replicate'" in caught.value.message
    assert KEY not in caught.value.message


async def test_refused_urls_are_never_fetched(fake: FakeReplicate, provider: Provider) -> None:
    fake.inject(Fault.URL_OUTSIDE)
    with pytest.raises(UpstreamError):
        await provider.generate(kit.call(SCHNELL, n=2))
    assert fake.outputs.fetched == []


async def test_credential_quoted_by_the_upstream_is_scrubbed(
    fake: FakeReplicate, provider: Provider
) -> None:
    fake.echo_credential = True
    fake.inject(Fault.SERVER_ERROR)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(kit.call(SCHNELL))
    assert "[redacted]" in caught.value.message
    assert KEY not in caught.value.message


async def test_rate_limit_passes_retry_after(fake: FakeReplicate, provider: Provider) -> None:
    fake.inject(Fault.RATE_LIMITED)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(kit.call(SCHNELL))
    assert caught.value.retryable and caught.value.retry_after_s == 5.0


async def test_nsfw_failure_is_a_safety_refusal(fake: FakeReplicate, provider: Provider) -> None:
    fake.inject(Fault.SAFETY)
    with pytest.raises(ContentPolicy) as caught:
        await provider.generate(kit.call(SCHNELL))
    assert NSFW_ERROR in caught.value.message
    assert fake.canceled == []  # it had ended: nothing to cancel


async def test_other_failure_fails_over(fake: FakeReplicate, provider: Provider) -> None:
    fake.fail_with = "CUDA error: out of memory"
    with pytest.raises(UpstreamError, match="failed the prediction: CUDA error") as caught:
        await provider.generate(kit.call(SCHNELL))
    assert not caught.value.retryable


async def test_validation_error_names_our_parameter(
    fake: FakeReplicate, provider: Provider
) -> None:
    fake.inject(Fault.BAD_REQUEST)
    with pytest.raises(UpstreamRejected) as caught:
        await provider.generate(kit.call(SCHNELL))
    assert caught.value.param == "size"
    assert "aspect_ratio must be one of" in caught.value.message


async def test_poll_that_never_finishes_stops_and_is_cancelled(
    fake: FakeReplicate, provider: Provider
) -> None:
    fake.inject(Fault.POLL_FOREVER)
    task = asyncio.create_task(provider.generate(kit.call(SCHNELL)))
    await kit.until(lambda: fake.polls() >= 2)
    task.cancel()  # what the dispatcher does at the deadline
    with pytest.raises(asyncio.CancelledError):
        await task
    [prediction] = fake.predictions
    await kit.until(lambda: fake.canceled == [prediction])
    polled = fake.polls()
    await asyncio.sleep(jobs.POLL_MAX_S * 1.5)  # longer than any poll interval
    assert fake.polls() == polled
    cancel = next(r for r in fake.requests if r.path.endswith("/cancel"))
    assert cancel.method == "POST" and cancel.headers["Authorization"] == f"Bearer {KEY}"


async def test_poll_url_on_a_foreign_host_is_refused(
    fake: FakeReplicate, provider: Provider
) -> None:
    fake.processing_polls = 1
    fake.urls_base = "http://169.254.169.254"
    with pytest.raises(UpstreamError, match=r"job URL on a host it may not use \(169"):
        await provider.generate(kit.call(SCHNELL))
    assert fake.polls() == 0
    assert fake.canceled == []  # the cancel URL is refused too: our token stays home


async def test_missing_credential_names_the_variable(fake: FakeReplicate) -> None:
    settings = replicate.ProviderSettings(id="r", kind="replicate", base_url=fake.base_url)
    deps = replicate.AdapterDeps(http=None, download=None, env={})  # type: ignore[arg-type]
    with pytest.raises(MissingCredentials, match="REPLICATE_API_TOKEN"):
        replicate.create(settings, deps)
