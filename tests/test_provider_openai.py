"""The openai and openai_compatible adapters against the fake OpenAI server on 127.0.0.1."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest
from PIL import Image

from service.catalog import CatalogError
from service.errors import ContentPolicy, ImagegateError, UpstreamError, UpstreamRejected
from service.providers import openai
from service.providers.base import AdapterDeps, MissingCredentials, Provider, ProviderSettings
from service.providers.download import SafeDownloader
from service.providers.openai_wire import refusal
from tests.fakes.base import Fault
from tests.fakes.openai import OPENAI_KEY, FakeOpenAI, image_call

DOWNLOAD_CAP = 512 * 1024


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(compatible_models={"flux-schnell"}, oversize_bytes=2 * DOWNLOAD_CAP)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.fixture
async def downloader() -> AsyncIterator[SafeDownloader]:
    d = SafeDownloader("oai", ["127.0.0.1"], max_bytes=DOWNLOAD_CAP, timeout_s=5)
    yield d
    await d.aclose()


@pytest.fixture
def make(fake: FakeOpenAI, session: aiohttp.ClientSession, downloader: SafeDownloader) -> object:
    def build(
        kind: str = "openai",
        env: Mapping[str, str] | None = None,
        **settings: object,
    ) -> Provider:
        values: dict[str, object] = {"base_url": fake.openai_base, "timeout_s": 5.0}
        values.update(settings)
        deps = AdapterDeps(
            session, downloader, {"OPENAI_API_KEY": OPENAI_KEY} if env is None else env
        )
        return openai.create(ProviderSettings(id="oai", kind=kind, **values), deps)  # type: ignore[arg-type]

    return build


def decoded(data: bytes) -> tuple[str, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        return str(image.format), image.size


async def test_gpt_image_body_headers_bytes_and_usage(make, fake: FakeOpenAI) -> None:
    provider = make()
    call = image_call(
        "gpt-image-1",
        n=2,
        quality="high",
        background="transparent",
        moderation="low",
        user="user-42",
        request_id="req-abc",
    )
    result = await provider.generate(call)

    seen = fake.requests[-1]
    assert seen.path == "/v1/images/generations"
    assert seen.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert seen.headers["X-Client-Request-Id"] == "req-abc"
    assert seen.json == {
        "model": "gpt-image-1",
        "prompt": "a lighthouse at dusk",
        "n": 2,
        "size": "1024x1024",
        "quality": "high",
        "output_format": "png",
        "background": "transparent",
        "moderation": "low",
        "user": "user-42",
    }
    assert [img.content_type for img in result.images] == ["image/png", "image/png"]
    assert all(decoded(img.data)[0] == "PNG" for img in result.images)
    assert result.images[0].data != result.images[1].data
    assert result.images[0].revised_prompt is None
    text_tokens = len("a lighthouse at dusk") // 4
    assert (result.usage.input_text_tokens, result.usage.input_image_tokens) == (text_tokens, 0)
    assert result.usage.output_tokens == 2 * 4160


async def test_gpt_image_jpeg_with_compression(make, fake: FakeOpenAI) -> None:
    call = image_call("gpt-image-1-mini", output_format="jpeg", output_compression=60)
    result = await make().generate(call)
    assert fake.requests[-1].json["output_compression"] == 60
    assert "response_format" not in fake.requests[-1].json
    assert result.images[0].content_type == "image/jpeg"
    assert decoded(result.images[0].data)[0] == "JPEG"


async def test_dall_e_3_asks_b64_and_returns_revised_prompt(make, fake: FakeOpenAI) -> None:
    call = image_call("dall-e-3", quality="hd", style="natural")
    result = await make().generate(call)
    assert fake.requests[-1].json == {
        "model": "dall-e-3",
        "prompt": "a lighthouse at dusk",
        "n": 1,
        "size": "1024x1024",
        "quality": "hd",
        "style": "natural",
        "response_format": "b64_json",
    }
    assert result.images[0].revised_prompt == "A detailed rendering of: a lighthouse at dusk"
    assert result.usage.total_tokens == 0


async def test_dall_e_2_sends_no_quality(make, fake: FakeOpenAI) -> None:
    result = await make().generate(image_call("dall-e-2", n=3, quality="standard"))
    assert fake.requests[-1].json == {
        "model": "dall-e-2",
        "prompt": "a lighthouse at dusk",
        "n": 3,
        "size": "1024x1024",
        "response_format": "b64_json",
    }
    assert len(result.images) == 3


async def test_fake_refuses_response_format_for_gpt_image_like_openai(
    make, fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    # The fake must be as strict as OpenAI, or the adapter's care proves nothing.
    async with session.post(
        f"{fake.openai_base}/images/generations",
        json={"model": "gpt-image-1", "prompt": "x", "response_format": "b64_json"},
        headers={"Authorization": f"Bearer {OPENAI_KEY}"},
    ) as response:
        assert response.status == 400
        assert await response.json() == {
            "error": {
                "message": "Unknown parameter: 'response_format'.",
                "type": "invalid_request_error",
                "param": "response_format",
                "code": "unknown_parameter",
            }
        }


async def test_compatible_server_without_key_answering_urls(
    make, session: aiohttp.ClientSession, downloader: SafeDownloader
) -> None:
    server = FakeOpenAI(openai_key=None, compatible_models={"flux-schnell"}, url_only=True)
    await server.start()
    try:
        provider = make(kind="openai_compatible", env={}, base_url=server.openai_base)
        result = await provider.generate(image_call("flux-schnell", n=2))
        seen = server.requests[0]
        assert "Authorization" not in seen.headers
        assert seen.json == {
            "model": "flux-schnell",
            "prompt": "a lighthouse at dusk",
            "n": 2,
            "size": "1024x1024",
            "response_format": "b64_json",
        }
        # The images were fetched from the server's URLs, not handed on.
        assert [s.path for s in server.requests[1:]] == ["/files/img-0.png", "/files/img-1.png"]
        assert [img.data for img in result.images] == list(server.files.values())
        server.relative_urls = True
        result = await provider.generate(image_call("flux-schnell"))
        assert server.requests[-1].path == "/files/img-2.png"
        assert result.images[0].data == server.files["img-2.png"]
    finally:
        await server.stop()


async def test_compatible_server_with_configured_key(make, fake: FakeOpenAI) -> None:
    provider = make(
        kind="openai_compatible", env={"LOCAL_KEY": OPENAI_KEY}, api_key_env="LOCAL_KEY"
    )
    await provider.generate(image_call("flux-schnell"))
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {OPENAI_KEY}"


def test_credentials_and_settings_at_creation(make) -> None:
    with pytest.raises(MissingCredentials, match=r"^OPENAI_API_KEY is not set$"):
        make(env={})
    with pytest.raises(MissingCredentials, match=r"^MY_KEY is not set$"):
        make(env={"OPENAI_API_KEY": OPENAI_KEY}, api_key_env="MY_KEY")
    # A compatible server never receives OpenAI's key by default.
    with pytest.raises(MissingCredentials, match="LOCAL_KEY"):
        make(kind="openai_compatible", env={"OPENAI_API_KEY": OPENAI_KEY}, api_key_env="LOCAL_KEY")
    with pytest.raises(CatalogError, match="needs a base_url"):
        make(kind="openai_compatible", base_url="")
    with pytest.raises(CatalogError, match="max_n"):
        make(options={"max_n": "11"})


def test_max_n_per_model(make) -> None:
    provider = make()
    assert provider.max_n("dall-e-3") == 1
    assert provider.max_n("dall-e-2") == 10
    assert provider.max_n("gpt-image-1") == 10
    compatible = make(kind="openai_compatible", env={})
    assert compatible.max_n("flux-schnell") == 1
    assert compatible.max_n("gpt-image-1") == 10
    assert make(kind="openai_compatible", env={}, options={"max_n": "4"}).max_n("sdxl") == 4


async def test_default_base_url_is_openai(session, downloader) -> None:
    provider = openai.create(
        ProviderSettings(id="oai", kind="openai"),
        AdapterDeps(session, downloader, {"OPENAI_API_KEY": OPENAI_KEY}),
    )
    assert provider._url == "https://api.openai.com/v1/images/generations"  # type: ignore[attr-defined]


async def test_request_id_header_only_when_openai_accepts_it(make, fake: FakeOpenAI) -> None:
    await make().generate(image_call("gpt-image-1", request_id="caf\u00e9"))
    assert "X-Client-Request-Id" not in fake.requests[-1].headers
    await make().generate(image_call("gpt-image-1", request_id="x" * 513))
    assert "X-Client-Request-Id" not in fake.requests[-1].headers


async def test_extra_images_are_dropped(make, fake: FakeOpenAI) -> None:
    fake.inject(Fault.EXTRA_IMAGES)
    result = await make().generate(image_call("dall-e-2", n=2))
    assert len(result.images) == 2


@pytest.mark.parametrize(
    ("fault", "model", "error", "retryable", "text"),
    [
        (Fault.SERVER_ERROR, "gpt-image-1", UpstreamError, True, "failed with HTTP 500"),
        (Fault.RATE_LIMITED, "gpt-image-1", UpstreamError, True, "failed with HTTP 429"),
        (Fault.STALL, "gpt-image-1", UpstreamError, True, "timed out"),
        (Fault.RESET, "gpt-image-1", UpstreamError, True, "could not be reached"),
        (Fault.MALFORMED, "gpt-image-1", UpstreamError, False, "not JSON"),
        (Fault.AUTH, "gpt-image-1", UpstreamError, False, "refused the gateway's credentials"),
        (Fault.SAFETY, "gpt-image-1", ContentPolicy, None, "rejected by the safety system"),
        (Fault.SAFETY, "dall-e-3", ContentPolicy, None, "as a result of our safety system"),
        (Fault.BAD_REQUEST, "gpt-image-1", UpstreamRejected, None, "rejected the request"),
        (Fault.URL_OUTSIDE, "dall-e-2", UpstreamError, False, "host not allowed"),
        (Fault.URL_METADATA, "dall-e-2", UpstreamError, False, "host not allowed"),
        (Fault.OVERSIZE, "dall-e-2", UpstreamError, False, "too large"),
    ],
)
async def test_faults_become_domain_errors_without_the_key(
    make,
    fake: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    fault: Fault,
    model: str,
    error: type[ImagegateError],
    retryable: bool | None,
    text: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.inject(fault)
    provider = make(timeout_s=0.5)
    with pytest.raises(error) as caught:
        await provider.generate(image_call(model))
    exc = caught.value
    assert text in exc.message
    if isinstance(exc, UpstreamError):
        assert exc.retryable is retryable
        assert "'oai'" in exc.message
    if fault is Fault.RATE_LIMITED:
        assert isinstance(exc, UpstreamError) and exc.retry_after_s == 7
    if fault is Fault.BAD_REQUEST:
        assert exc.param == "size"
    assert OPENAI_KEY not in str(exc)
    assert not [r for r in caplog.records if OPENAI_KEY in r.getMessage()]


async def test_upstream_text_quoting_the_key_is_scrubbed(make, fake: FakeOpenAI) -> None:
    fake.echo_in_errors = OPENAI_KEY
    for fault in (Fault.BAD_REQUEST, Fault.SAFETY, Fault.SERVER_ERROR):
        fake.inject(fault)
        with pytest.raises(ImagegateError) as caught:
            await make().generate(image_call("gpt-image-1"))
        assert OPENAI_KEY not in caught.value.message
        assert "[redacted]" in caught.value.message


async def test_upstream_refusal_of_a_parameter_names_it(make, fake: FakeOpenAI) -> None:
    # dall-e-3 makes one image per call; asked for two, OpenAI names `n`, and so does the
    # error (a 400 for the caller, not a 502).
    call = image_call("dall-e-3", n=2)
    with pytest.raises(UpstreamRejected) as caught:
        await make().generate(call)
    assert caught.value.param == "n"


async def test_usage_is_passed_as_reported_for_the_core_to_judge(make, fake: FakeOpenAI) -> None:
    # The core refuses negative or absurd counts and charges per image (costs.py); the
    # adapter keeps the images, and marks a count that is not an integer as -1.
    fake.usage_override = {"input_tokens": -5, "output_tokens": 10**12}
    result = await make().generate(image_call("gpt-image-1"))
    assert len(result.images) == 1
    assert (result.usage.input_text_tokens, result.usage.output_tokens) == (-5, 10**12)
    fake.usage_override = {"input_tokens": 10.5, "output_tokens": "many"}
    result = await make().generate(image_call("gpt-image-1"))
    assert (result.usage.input_text_tokens, result.usage.output_tokens) == (-1, -1)


async def test_usage_without_details_counts_as_text(make, fake: FakeOpenAI) -> None:
    fake.usage_override = {"input_tokens": 30, "output_tokens": 272, "total_tokens": 302}
    result = await make().generate(image_call("gpt-image-1"))
    assert (result.usage.input_text_tokens, result.usage.output_tokens) == (30, 272)


async def test_unknown_upstream_model_is_the_route_s_fault(make, fake: FakeOpenAI) -> None:
    with pytest.raises(UpstreamError) as caught:
        await make().generate(image_call("gpt-image-1", "imagine-9"))
    assert not caught.value.retryable
    assert "model_not_found" in caught.value.message


def test_a_complaint_about_model_is_the_route_s_fault() -> None:
    # The caller never names the upstream model: a 400 about it must fail over, not blame them.
    payload = {"error": {"message": "Invalid model", "param": "model", "code": "invalid_value"}}
    exc = refusal("oai", 400, {}, payload)
    assert isinstance(exc, UpstreamError) and not exc.retryable


@pytest.mark.parametrize(
    ("status", "code"),
    [(429, "insufficient_quota"), (400, "billing_hard_limit_reached")],
)
def test_account_refusals_fail_over_without_retry(status: int, code: str) -> None:
    exc = refusal("oai", status, {"Retry-After": "3"}, {"error": {"message": "m", "code": code}})
    assert isinstance(exc, UpstreamError)
    assert not exc.retryable
    assert code in exc.message


def test_error_reported_with_http_200_is_still_an_error() -> None:
    safety = {"error": {"message": "blocked", "code": "content_policy_violation"}}
    assert isinstance(refusal("oai", 200, {}, safety), ContentPolicy)
    other = refusal("oai", 200, {}, {"error": {"message": "backend crashed"}})
    assert isinstance(other, UpstreamError) and "backend crashed" in other.message
