"""The Gemini API Imagen adapter against the fake Google upstream: wire, images, every fault."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from service.catalog import CatalogError
from service.errors import ContentPolicy, UpstreamError, UpstreamRejected
from service.providers import google
from service.providers.base import AdapterDeps, MissingCredentials, ProviderSettings
from service.providers.download import SafeDownloader
from tests.fakes.base import Fault, image_bytes
from tests.fakes.calls import upstream_call
from tests.fakes.google import (
    BLOCKED_WORD,
    OUTPUT_REFUSAL,
    RETRY_DELAY_S,
    GoogleFake,
)
from tests.large_replies import NOT_BASE64, SMALL_NOT_BASE64, b64, decoded_on_arrival, large_image

KEY = "AIzaFAKE-gemini-key-0123456789"
TOKEN = "ya29.fake-vertex-token"
MODEL = "imagen-3.0-generate-002"


@pytest.fixture
async def fake() -> AsyncIterator[GoogleFake]:
    fake = GoogleFake(api_key=KEY, token=TOKEN)
    fake.stall_s = 5.0
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def deps() -> AsyncIterator[AdapterDeps]:
    async with aiohttp.ClientSession() as http:
        download = SafeDownloader("gemini", ["127.0.0.1"])
        yield AdapterDeps(http=http, download=download, env={"GEMINI_API_KEY": KEY})
        await download.aclose()


def settings(fake: GoogleFake, **options: str) -> ProviderSettings:
    return ProviderSettings(
        id="gemini", kind="google", base_url=fake.base_url, timeout_s=1.0, options=options
    )


@pytest.fixture
def provider(fake: GoogleFake, deps: AdapterDeps) -> google.GeminiImagen:
    return google.create(settings(fake), deps)


async def test_request_on_the_wire(provider: google.GeminiImagen, fake: GoogleFake) -> None:
    await provider.generate(upstream_call(MODEL, n=2, size="1792x1024"))
    (seen,) = fake.requests
    assert (seen.method, seen.path) == ("POST", f"/v1beta/models/{MODEL}:predict")
    assert seen.headers["x-goog-api-key"] == KEY
    assert "Authorization" not in seen.headers
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.json == {
        "instances": [{"prompt": "a lighthouse at dusk"}],
        "parameters": {"sampleCount": 2, "aspectRatio": "16:9", "includeRaiReason": True},
    }


async def test_success_returns_the_decoded_images(provider: google.GeminiImagen) -> None:
    result = await provider.generate(upstream_call(MODEL, n=3))
    assert [image.data for image in result.images] == [image_bytes(seed=i) for i in range(3)]
    assert {image.content_type for image in result.images} == {"image/png"}
    assert all(image.revised_prompt is None for image in result.images)
    assert provider.max_n(MODEL) == 4


async def test_enhanced_prompt_becomes_revised_prompt(
    provider: google.GeminiImagen, fake: GoogleFake
) -> None:
    fake.revised_prompt = "A tall lighthouse at dusk, warm light"
    result = await provider.generate(upstream_call(MODEL))
    assert result.images[0].revised_prompt == "A tall lighthouse at dusk, warm light"


@pytest.mark.parametrize(
    ("size", "ratio"),
    [
        ("1024x1024", "1:1"),
        ("1792x1024", "16:9"),
        ("1024x1792", "9:16"),
        ("1536x1024", "4:3"),
        ("1024x1536", "3:4"),
        ("1408x768", "16:9"),
        ("896x1280", "3:4"),
        ("auto", "1:1"),
    ],
)
def test_size_maps_to_the_nearest_imagen_aspect_ratio(size: str, ratio: str) -> None:
    assert google.aspect_ratio(size) == ratio


async def test_jpeg_output_options(provider: google.GeminiImagen, fake: GoogleFake) -> None:
    result = await provider.generate(
        upstream_call(MODEL, output_format="jpeg", output_compression=70)
    )
    assert fake.requests[0].json["parameters"]["outputOptions"] == {
        "mimeType": "image/jpeg",
        "compressionQuality": 70,
    }
    assert result.images[0].content_type == "image/jpeg"
    assert result.images[0].data == image_bytes("JPEG", seed=0)


async def test_webp_is_refused_before_any_call(
    provider: google.GeminiImagen, fake: GoogleFake
) -> None:
    with pytest.raises(UpstreamRejected) as caught:
        await provider.generate(upstream_call(MODEL, output_format="webp"))
    assert caught.value.param == "output_format"
    assert fake.requests == []


async def test_person_generation_option_is_sent(fake: GoogleFake, deps: AdapterDeps) -> None:
    provider = google.create(settings(fake, person_generation="dont_allow"), deps)
    await provider.generate(upstream_call(MODEL))
    assert fake.requests[0].json["parameters"]["personGeneration"] == "dont_allow"
    with pytest.raises(CatalogError, match="person_generation"):
        google.create(settings(fake, person_generation="everyone"), deps)


async def test_credential_variable(fake: GoogleFake, deps: AdapterDeps) -> None:
    empty = AdapterDeps(deps.http, deps.download, {})
    with pytest.raises(MissingCredentials, match="GEMINI_API_KEY"):
        google.create(settings(fake), empty)
    other = AdapterDeps(deps.http, deps.download, {"GOOGLE_API_KEY": KEY})
    named = ProviderSettings("gemini", "google", fake.base_url, api_key_env="GOOGLE_API_KEY")
    result = await google.create(named, other).generate(upstream_call(MODEL))
    assert len(result.images) == 1


async def test_some_images_filtered_delivers_the_rest(
    provider: google.GeminiImagen, fake: GoogleFake
) -> None:
    fake.filter_next = 2
    result = await provider.generate(upstream_call(MODEL, n=4))
    assert [image.data for image in result.images] == [image_bytes(seed=i) for i in (2, 3)]


async def test_empty_reply_means_all_filtered(
    provider: google.GeminiImagen, fake: GoogleFake
) -> None:
    fake.filter_next, fake.silent_filter = 2, True
    with pytest.raises(ContentPolicy) as caught:
        await provider.generate(upstream_call(MODEL, n=2))
    assert caught.value.message == google.ALL_FILTERED
    assert google.parse_predictions(b"{}", "gemini") == ([], [])
    assert google.parse_predictions(b'{"predictions": []}', "gemini") == ([], [])
    with pytest.raises(UpstreamError, match="malformed"):
        google.parse_predictions(b'{"predictions": "none"}', "gemini")


async def test_prompt_refused_by_the_input_filter(provider: google.GeminiImagen) -> None:
    with pytest.raises(ContentPolicy) as caught:
        await provider.generate(upstream_call(MODEL, prompt=f"a {BLOCKED_WORD}"))
    assert "Responsible AI practices" in caught.value.message
    assert not caught.value.message.startswith("Image generation failed")


async def test_wrong_key_is_our_credentials_not_the_callers_request(
    fake: GoogleFake, deps: AdapterDeps
) -> None:
    wrong = AdapterDeps(deps.http, deps.download, {"GEMINI_API_KEY": "AIza-wrong"})
    with pytest.raises(UpstreamError) as caught:
        await google.create(settings(fake), wrong).generate(upstream_call(MODEL))
    # Gemini answers a bad key with 400 INVALID_ARGUMENT: still not a 400 for our caller.
    assert not isinstance(caught.value, UpstreamRejected)
    assert not caught.value.retryable
    assert "refused the gateway's credentials" in caught.value.message
    assert "AIza-wrong" not in caught.value.message


@pytest.mark.parametrize(
    ("status", "google_status", "retryable"),
    [
        (403, "PERMISSION_DENIED", False),
        (404, "NOT_FOUND", False),
        (400, "FAILED_PRECONDITION", False),
        (500, "INTERNAL", True),
        (503, "UNAVAILABLE", True),
    ],
)
async def test_google_statuses(
    provider: google.GeminiImagen,
    fake: GoogleFake,
    status: int,
    google_status: str,
    retryable: bool,
) -> None:
    fake.errors.append((status, google_status, "The service is having a moment.", []))
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(upstream_call(MODEL))
    assert not isinstance(caught.value, UpstreamRejected)
    assert caught.value.retryable is retryable


async def test_unknown_model_fails_over_rather_than_blaming_the_caller(
    provider: google.GeminiImagen,
) -> None:
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(upstream_call("imagen-9.9-nonexistent"))
    assert not caught.value.retryable
    assert "404" in caught.value.message


async def test_upstream_text_quoting_the_key_is_scrubbed(
    provider: google.GeminiImagen, fake: GoogleFake
) -> None:
    fake.errors.append((400, "INVALID_ARGUMENT", f"Bad request made with key {KEY}.", []))
    with pytest.raises(UpstreamRejected) as caught:
        await provider.generate(upstream_call(MODEL))
    assert KEY not in caught.value.message
    assert "[redacted]" in caught.value.message


FAULTS = [
    (Fault.SERVER_ERROR, UpstreamError, True),
    (Fault.RATE_LIMITED, UpstreamError, True),
    (Fault.STALL, UpstreamError, True),
    (Fault.RESET, UpstreamError, True),
    (Fault.MALFORMED, UpstreamError, False),
    (Fault.AUTH, UpstreamError, False),
    (Fault.SAFETY, ContentPolicy, None),
    (Fault.BAD_REQUEST, UpstreamRejected, None),
]


@pytest.mark.parametrize(("fault", "error", "retryable"), FAULTS, ids=lambda v: str(v))
async def test_fault(
    provider: google.GeminiImagen,
    fake: GoogleFake,
    caplog: pytest.LogCaptureFixture,
    fault: Fault,
    error: type[Exception],
    retryable: bool | None,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.inject(fault)
    with pytest.raises(error) as caught:
        await provider.generate(upstream_call(MODEL, n=2))
    assert type(caught.value) is error
    if retryable is not None:
        assert isinstance(caught.value, UpstreamError)
        assert caught.value.retryable is retryable
    if fault is Fault.RATE_LIMITED:
        assert isinstance(caught.value, UpstreamError)
        assert caught.value.retry_after_s == RETRY_DELAY_S
    if fault is Fault.SAFETY:
        assert str(caught.value) == OUTPUT_REFUSAL
    if fault is Fault.BAD_REQUEST:
        assert isinstance(caught.value, UpstreamRejected)
        assert caught.value.param == "prompt"
        assert "The prompt is too long." in caught.value.message
    assert KEY not in str(caught.value)
    assert KEY not in caplog.text
    assert all(KEY not in str(record.args) for record in caplog.records)


async def test_more_images_than_asked_are_not_an_error(
    provider: google.GeminiImagen, fake: GoogleFake
) -> None:
    fake.inject(Fault.EXTRA_IMAGES)
    result = await provider.generate(upstream_call(MODEL, n=2))
    assert len(result.images) == 4


async def test_a_large_reply_is_read_as_it_arrives(
    provider: google.GeminiImagen, fake: GoogleFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = decoded_on_arrival(monkeypatch)
    images = [large_image(seed=i) for i in range(3)]
    fake.image_texts = [b64(image) for image in images]
    fake.revised_prompt = "a lighthouse at dusk, oil on canvas"
    result = await provider.generate(upstream_call(MODEL, n=3))
    assert [image.data for image in result.images] == images
    assert {image.content_type for image in result.images} == {"image/png"}
    assert {image.revised_prompt for image in result.images} == {fake.revised_prompt}
    assert decoded == images  # taken from the reply as it came, not parsed whole


@pytest.mark.parametrize("mangle", NOT_BASE64.values(), ids=NOT_BASE64)
async def test_a_large_image_not_base64_is_refused_as_a_small_one(
    provider: google.GeminiImagen,
    fake: GoogleFake,
    monkeypatch: pytest.MonkeyPatch,
    mangle: Callable[[str], str],
) -> None:
    fake.image_texts = [SMALL_NOT_BASE64]
    with pytest.raises(UpstreamError) as small:
        await provider.generate(upstream_call(MODEL))
    decoded = decoded_on_arrival(monkeypatch)
    fake.image_texts = [mangle(b64(large_image()))]
    with pytest.raises(UpstreamError) as large:
        await provider.generate(upstream_call(MODEL))
    assert decoded == [None]
    assert str(large.value) == str(small.value)
    assert "not valid base64" in str(large.value) and not large.value.retryable
