"""The Stability adapter against the fake Stability API: wire format, images, every fault."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Callable

import pytest
from PIL import Image

from service.errors import ContentPolicy, UpstreamError, UpstreamRejected
from service.providers import stability
from service.providers.base import MissingCredentials, Provider, TokenUsage
from tests import adapter_kit as kit
from tests.fakes.base import Fault
from tests.fakes.stability import FakeStability
from tests.large_replies import NOT_BASE64, SMALL_NOT_BASE64, b64, decoded_on_arrival, large_image

KEY = "sk-stab-FAKE-3f9a27c1d0"


@pytest.fixture
async def fake() -> AsyncIterator[FakeStability]:
    server = FakeStability(KEY)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def provider(fake: FakeStability) -> AsyncIterator[Provider]:
    async with kit.adapter(
        stability.create, "stability", fake.base_url, {"STABILITY_API_KEY": KEY}
    ) as made:
        yield made


@pytest.fixture(autouse=True)
def _no_credential_logged(caplog: pytest.LogCaptureFixture) -> object:
    caplog.set_level(logging.DEBUG)
    yield
    kit.assert_no_secret(KEY, caplog)


async def test_request_on_the_wire_and_image_back(fake: FakeStability, provider: Provider) -> None:
    result = await provider.generate(
        kit.call(
            "stable-image-ultra",
            prompt="a red kite",
            size="1792x1024",
            output_format="jpeg",
            user="end-user-9",
        )
    )
    [seen] = fake.requests
    assert (seen.method, seen.path) == ("POST", "/v2beta/stable-image/generate/ultra")
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.headers["Accept"] == "application/json"
    assert seen.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert seen.headers["stability-client-user-id"] == "end-user-9"
    assert seen.form == {"prompt": "a red kite", "aspect_ratio": "16:9", "output_format": "jpeg"}
    [image] = result.images
    assert image.content_type == "image/jpeg"
    assert Image.open(io.BytesIO(image.data)).format == "JPEG"
    assert image.revised_prompt is None
    assert result.usage == TokenUsage()


@pytest.mark.parametrize(
    ("upstream_model", "family", "path", "model_field"),
    [
        ("stable-image-core", "", "core", None),
        ("sd3.5-large", "", "sd3", "sd3.5-large"),
        ("sd3.5-medium", "sd3", "sd3", "sd3.5-medium"),
        ("my-core-alias", "stable-image-core", "core", None),
    ],
)
async def test_endpoint_from_family_or_model_name(
    fake: FakeStability,
    provider: Provider,
    upstream_model: str,
    family: str,
    path: str,
    model_field: str | None,
) -> None:
    result = await provider.generate(kit.call(upstream_model, family=family, size="1024x1536"))
    [seen] = fake.requests
    assert seen.path == f"/v2beta/stable-image/generate/{path}"
    assert seen.form.get("model") == model_field
    assert seen.form["aspect_ratio"] == "2:3"
    assert result.images[0].content_type == "image/png"


def test_one_image_per_call(provider: Provider) -> None:
    assert provider.max_n("stable-image-core") == 1
    assert provider.max_n("sd3.5-large") == 1


@pytest.mark.parametrize(
    ("fault", "retryable", "words"),
    [
        (Fault.SERVER_ERROR, True, "HTTP 500"),
        (Fault.STALL, True, "timed out"),
        (Fault.RESET, True, "could not be reached"),
        (Fault.MALFORMED, False, "not JSON"),
        (Fault.AUTH, False, "refused the gateway's credentials"),
    ],
)
async def test_upstream_failures(
    fake: FakeStability, provider: Provider, fault: Fault, retryable: bool, words: str
) -> None:
    fake.inject(fault)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(kit.call("stable-image-core"))
    assert caught.value.retryable is retryable
    assert words in caught.value.message
    assert "'stability'" in caught.value.message
    assert KEY not in caught.value.message


async def test_credential_quoted_by_the_upstream_is_scrubbed(
    fake: FakeStability, provider: Provider
) -> None:
    fake.echo_credential = True
    fake.inject(Fault.SERVER_ERROR)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(kit.call("stable-image-core"))
    assert "[redacted]" in caught.value.message
    assert KEY not in caught.value.message


async def test_rate_limit_passes_retry_after(fake: FakeStability, provider: Provider) -> None:
    fake.inject(Fault.RATE_LIMITED)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(kit.call("stable-image-core"))
    assert caught.value.retryable
    assert caught.value.retry_after_s == 7.0
    assert "HTTP 429" in caught.value.message


async def test_content_moderation_403_is_a_safety_refusal_not_a_credential_error(
    fake: FakeStability, provider: Provider
) -> None:
    fake.inject(Fault.SAFETY)
    with pytest.raises(ContentPolicy) as caught:
        await provider.generate(kit.call("stable-image-core"))
    assert "flagged by our content moderation system" in caught.value.message


async def test_content_filtered_image_is_never_delivered(
    fake: FakeStability, provider: Provider
) -> None:
    fake.safety = "filtered"
    fake.inject(Fault.SAFETY)
    with pytest.raises(ContentPolicy, match="filtered the generated image"):
        await provider.generate(kit.call("stable-image-core"))


async def test_bad_request_names_our_parameter(fake: FakeStability, provider: Provider) -> None:
    fake.inject(Fault.BAD_REQUEST)
    with pytest.raises(UpstreamRejected) as caught:
        await provider.generate(kit.call("stable-image-core"))
    assert caught.value.param == "size"
    assert "aspect_ratio: is not supported" in caught.value.message


async def test_format_the_endpoint_refuses_is_a_rejected_request(provider: Provider) -> None:
    # SD3 makes no WebP: the fake answers Stability's 400, which names the field.
    with pytest.raises(UpstreamRejected) as caught:
        await provider.generate(kit.call("sd3.5-large", output_format="webp"))
    assert caught.value.param == "output_format"


async def test_wrong_key_is_a_credential_error_without_the_key(fake: FakeStability) -> None:
    env = {"STABILITY_API_KEY": "sk-wrong-key-123"}
    async with kit.adapter(stability.create, "stability", fake.base_url, env) as provider:
        with pytest.raises(UpstreamError) as caught:
            await provider.generate(kit.call("stable-image-core"))
    assert not caught.value.retryable
    assert "HTTP 401" in caught.value.message
    assert "sk-wrong-key-123" not in caught.value.message


async def test_credential_from_the_configured_variable(fake: FakeStability) -> None:
    with pytest.raises(MissingCredentials, match="STABILITY_API_KEY"):
        stability.create(stability_settings(fake.base_url), kit_deps_without_http({"OTHER": KEY}))
    env = {"MY_STABILITY": KEY}
    async with kit.adapter(
        stability.create, "stability", fake.base_url, env, api_key_env="MY_STABILITY"
    ) as provider:
        assert (await provider.generate(kit.call("stable-image-core"))).images


def stability_settings(base_url: str) -> stability.ProviderSettings:
    return stability.ProviderSettings(id="stability", kind="stability", base_url=base_url)


def kit_deps_without_http(env: dict[str, str]) -> stability.AdapterDeps:
    # The factory fails on the credential before it touches the session or downloader.
    return stability.AdapterDeps(http=None, download=None, env=env)  # type: ignore[arg-type]


async def test_a_large_reply_is_read_as_it_arrives(
    fake: FakeStability, provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = decoded_on_arrival(monkeypatch)
    fake.image_texts = [b64(large_image())]
    [image] = (await provider.generate(kit.call("stable-image-core"))).images
    assert (image.data, image.content_type) == (large_image(), "image/png")
    assert decoded == [large_image()]  # taken from the reply as it came, not parsed whole
    # A large stand-in for a filtered image is never delivered either.
    fake.safety = "filtered"
    fake.inject(Fault.SAFETY)
    with pytest.raises(ContentPolicy):
        await provider.generate(kit.call("stable-image-core"))


@pytest.mark.parametrize("mangle", NOT_BASE64.values(), ids=NOT_BASE64)
async def test_a_large_image_not_base64_is_refused_as_a_small_one(
    fake: FakeStability,
    provider: Provider,
    monkeypatch: pytest.MonkeyPatch,
    mangle: Callable[[str], str],
) -> None:
    fake.image_texts = [SMALL_NOT_BASE64]
    with pytest.raises(UpstreamError) as small:
        await provider.generate(kit.call("stable-image-core"))
    decoded = decoded_on_arrival(monkeypatch)
    fake.image_texts = [mangle(b64(large_image()))]
    with pytest.raises(UpstreamError) as large:
        await provider.generate(kit.call("stable-image-core"))
    assert decoded == [None]
    assert str(large.value) == str(small.value)
    assert "not valid base64" in str(large.value) and not large.value.retryable
