"""The azure_openai adapter against the fake Azure OpenAI endpoints on 127.0.0.1."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
import pytest

from service.errors import ContentPolicy, ImagegateError, UpstreamError, UpstreamRejected
from service.providers import azure
from service.providers.base import AdapterDeps, MissingCredentials, Provider, ProviderSettings
from service.providers.download import SafeDownloader
from service.providers.openai_wire import Upstream
from tests.fakes.base import Fault
from tests.fakes.openai import (
    AZURE_KEY,
    OPENAI_KEY,
    FakeOpenAI,
    content_filter_results,
    image_call,
)

# Deployment names that say nothing about the model, as in real resources.
DEPLOYMENTS = {"prod-images": "gpt-image-1", "hero-art": "dall-e-3", "thumbs": "dall-e-2"}

Make = Callable[..., Provider]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(deployments=DEPLOYMENTS)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def make(fake: FakeOpenAI) -> AsyncIterator[Make]:
    async with aiohttp.ClientSession() as http:
        download = SafeDownloader("az", ["127.0.0.1"], max_bytes=512 * 1024, timeout_s=5)

        def build(env: Mapping[str, str] | None = None, **settings: object) -> Provider:
            values: dict[str, object] = {"base_url": fake.base_url + "/", "timeout_s": 5.0}
            values.update(settings)
            deps = AdapterDeps(
                http, download, {"AZURE_OPENAI_API_KEY": AZURE_KEY} if env is None else env
            )
            return azure.create(ProviderSettings(id="az", kind="azure_openai", **values), deps)  # type: ignore[arg-type]

        yield build
        await download.aclose()


async def test_deployment_form_url_headers_and_body(make: Make, fake: FakeOpenAI) -> None:
    # Neither the catalog id nor the deployment shows the model: the catalog's family does.
    call = image_call(
        "house-style", "prod-images", family="gpt-image", n=2, quality="low", request_id="req-az-1"
    )
    result = await make().generate(call)
    seen = fake.requests[-1]
    assert seen.path == "/openai/deployments/prod-images/images/generations"
    assert seen.query == {"api-version": "2025-04-01-preview"}
    assert seen.headers["api-key"] == AZURE_KEY
    assert "Authorization" not in seen.headers
    assert seen.headers["x-ms-client-request-id"] == "req-az-1"
    # The deployment names the model: no `model` in the body, and no response_format.
    assert seen.json == {
        "prompt": "a lighthouse at dusk",
        "n": 2,
        "size": "1024x1024",
        "quality": "low",
        "output_format": "png",
    }
    assert len(result.images) == 2
    assert result.usage.output_tokens == 2 * 272


async def test_dall_e_3_deployment_with_dated_api_version(make: Make, fake: FakeOpenAI) -> None:
    provider = make(options={"api_version": "2024-10-21"})
    call = image_call("hero", "hero-art", family="dall-e-3", style="vivid")
    result = await provider.generate(call)
    seen = fake.requests[-1]
    assert seen.query == {"api-version": "2024-10-21"}
    assert seen.json["response_format"] == "b64_json"
    assert seen.json["style"] == "vivid"
    assert result.images[0].revised_prompt == "A detailed rendering of: a lighthouse at dusk"
    assert result.images[0].content_type == "image/png"


async def test_v1_form_names_the_deployment_as_model(make: Make, fake: FakeOpenAI) -> None:
    provider = make(options={"api_version": "v1"})
    # No family in the catalog: the catalog id's name shows it.
    await provider.generate(image_call("dall-e-2", "thumbs", n=3))
    seen = fake.requests[-1]
    assert seen.path == "/openai/v1/images/generations"
    assert seen.query == {}
    assert seen.headers["api-key"] == AZURE_KEY
    assert seen.json == {
        "model": "thumbs",
        "prompt": "a lighthouse at dusk",
        "n": 3,
        "size": "1024x1024",
        "response_format": "b64_json",
    }


@pytest.mark.parametrize("api_version", ["2025-04-01-preview", "v1"])
async def test_unknown_deployment_fails_over(make: Make, api_version: str) -> None:
    provider = make(options={"api_version": api_version})
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(image_call("gpt-image-1", "no-such-deployment"))
    assert not caught.value.retryable
    assert "DeploymentNotFound" in caught.value.message


async def test_wrong_key_is_our_credentials_refused(make: Make) -> None:
    provider = make(env={"AZURE_OPENAI_API_KEY": "not-the-key"})
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(image_call("gpt-image-1", "prod-images"))
    assert not caught.value.retryable
    assert caught.value.message == (
        "The upstream provider 'az' refused the gateway's credentials (HTTP 401)."
    )


def test_creation_needs_endpoint_and_key(make: Make) -> None:
    with pytest.raises(MissingCredentials, match="AZURE_OPENAI_API_KEY"):
        make(env={"OPENAI_API_KEY": OPENAI_KEY})
    with pytest.raises(MissingCredentials, match="MY_AZURE"):
        make(api_key_env="MY_AZURE")
    with pytest.raises(MissingCredentials, match="AZURE_OPENAI_ENDPOINT"):
        make(base_url="")
    # The endpoint from Azure's standard variable when the catalog names none.
    assert make(
        base_url="",
        env={"AZURE_OPENAI_API_KEY": AZURE_KEY, "AZURE_OPENAI_ENDPOINT": "https://r.example"},
    )


def test_max_n_from_deployment_name_or_option(make: Make) -> None:
    provider = make()
    assert provider.max_n("prod-images") == 1  # the name says nothing: one per call
    assert provider.max_n("gpt-image-1") == 10
    assert provider.max_n("dall-e-3") == 1
    assert make(options={"max_n": "10"}).max_n("prod-images") == 10


@pytest.mark.parametrize(
    ("fault", "model", "deployment", "error", "retryable", "text"),
    [
        (Fault.SERVER_ERROR, "gpt-image-1", "prod-images", UpstreamError, True, "HTTP 500"),
        (Fault.RATE_LIMITED, "gpt-image-1", "prod-images", UpstreamError, True, "HTTP 429"),
        (Fault.STALL, "gpt-image-1", "prod-images", UpstreamError, True, "timed out"),
        (Fault.RESET, "gpt-image-1", "prod-images", UpstreamError, True, "could not be reached"),
        (Fault.MALFORMED, "gpt-image-1", "prod-images", UpstreamError, False, "not JSON"),
        (Fault.AUTH, "gpt-image-1", "prod-images", UpstreamError, False, "credentials"),
        (Fault.SAFETY, "dall-e-3", "hero-art", ContentPolicy, None, "safety system"),
        (Fault.SAFETY, "gpt-image-1", "prod-images", ContentPolicy, None, "safety system"),
        (Fault.BAD_REQUEST, "gpt-image-1", "prod-images", UpstreamRejected, None, "rejected"),
        (Fault.URL_METADATA, "dall-e-2", "thumbs", UpstreamError, False, "not allowed"),
    ],
)
async def test_faults_become_domain_errors_without_the_key(
    make: Make,
    fake: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    fault: Fault,
    model: str,
    deployment: str,
    error: type[ImagegateError],
    retryable: bool | None,
    text: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.echo_in_errors = AZURE_KEY
    fake.inject(fault)
    with pytest.raises(error) as caught:
        await make(timeout_s=0.5).generate(image_call(model, deployment))
    exc = caught.value
    assert text in exc.message
    if isinstance(exc, UpstreamError):
        assert exc.retryable is retryable
    if fault is Fault.RATE_LIMITED:
        assert isinstance(exc, UpstreamError) and exc.retry_after_s == 7
    assert AZURE_KEY not in str(exc)
    assert not [r for r in caplog.records if AZURE_KEY in r.getMessage()]


async def test_safety_refusal_shape_is_azure_s(fake: FakeOpenAI) -> None:
    # Guard on the fake: Azure's image refusal carries inner_error, as documented.
    fake.inject(Fault.SAFETY)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{fake.base_url}/openai/deployments/hero-art/images/generations",
            params={"api-version": "2024-10-21"},
            json={"prompt": "x"},
            headers={"api-key": AZURE_KEY},
        ) as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["code"] == "content_policy_violation"
    assert error["inner_error"]["code"] == "ResponsibleAIPolicyViolation"
    assert error["inner_error"]["content_filter_results"]["violence"]["filtered"] is True


async def test_missing_api_version_is_azure_s_404(fake: FakeOpenAI) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{fake.base_url}/openai/deployments/hero-art/images/generations",
            json={"prompt": "x"},
            headers={"api-key": AZURE_KEY},
        ) as response,
    ):
        assert response.status == 404
        assert await response.json() == {"error": {"code": "404", "message": "Resource not found"}}


async def test_filtered_image_in_a_200_is_a_safety_refusal() -> None:
    async with aiohttp.ClientSession() as http:
        upstream = Upstream("az", http, SafeDownloader("az", []), 5.0)
        item = {"content_filter_results": content_filter_results("sexual")}
        raw = json.dumps({"created": 1, "data": [item]}).encode()
        with pytest.raises(ContentPolicy):
            upstream._parse(raw, 1)


async def test_unsupported_api_version_fails_over(make: Make) -> None:
    provider = make(options={"api_version": "2025-13"})
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(image_call("gpt-image-1", "prod-images"))
    assert not caught.value.retryable
    assert "API version not supported" in caught.value.message
