"""The Vertex AI Imagen adapter against the fake Google upstream: token sources, wire, faults."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service.catalog import CatalogError
from service.errors import ContentPolicy, UpstreamError, UpstreamRejected
from service.providers import vertex
from service.providers.base import AdapterDeps, MissingCredentials, ProviderSettings
from service.providers.download import SafeDownloader
from tests.fakes.base import Fault, image_bytes
from tests.fakes.calls import upstream_call
from tests.fakes.google import OUTPUT_REFUSAL, RETRY_DELAY_S, GoogleFake
from tests.large_replies import b64, decoded_on_arrival, large_image

TOKEN = "ya29.fake-vertex-token-abcdef"
PROJECT = "proj-1"
MODEL = "imagen-3.0-generate-002"
PATH = f"/v1/projects/{PROJECT}/locations/us-central1/publishers/google/models/{MODEL}:predict"


@pytest.fixture
async def fake() -> AsyncIterator[GoogleFake]:
    fake = GoogleFake(api_key="unused", token=TOKEN, project=PROJECT)
    fake.stall_s = 5.0
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def deps() -> AsyncIterator[AdapterDeps]:
    async with aiohttp.ClientSession() as http:
        download = SafeDownloader("vertex", ["127.0.0.1"])
        yield AdapterDeps(http=http, download=download, env={"VERTEX_ACCESS_TOKEN": TOKEN})
        await download.aclose()


def settings(fake: GoogleFake, api_key_env: str = "", **options: str) -> ProviderSettings:
    options = {"project": PROJECT, "location": "us-central1", **options}
    return ProviderSettings(
        id="vertex",
        kind="vertex",
        base_url=fake.base_url,
        api_key_env=api_key_env,
        timeout_s=1.0,
        options=options,
    )


@pytest.fixture
async def provider(fake: GoogleFake, deps: AdapterDeps) -> AsyncIterator[vertex.VertexImagen]:
    provider = vertex.create(settings(fake), deps)
    yield provider
    await provider.aclose()


async def test_request_on_the_wire(provider: vertex.VertexImagen, fake: GoogleFake) -> None:
    result = await provider.generate(
        upstream_call(MODEL, n=2, size="1024x1792", output_format="jpeg", output_compression=80)
    )
    (seen,) = fake.requests
    assert (seen.method, seen.path) == ("POST", PATH)
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "x-goog-api-key" not in seen.headers
    assert seen.json == {
        "instances": [{"prompt": "a lighthouse at dusk"}],
        "parameters": {
            "sampleCount": 2,
            "aspectRatio": "9:16",
            "includeRaiReason": True,
            "outputOptions": {"mimeType": "image/jpeg", "compressionQuality": 80},
        },
    }
    assert [image.data for image in result.images] == [
        image_bytes("JPEG", seed=i) for i in range(2)
    ]
    assert provider.max_n(MODEL) == 4


async def test_vertex_only_parameters(fake: GoogleFake, deps: AdapterDeps) -> None:
    provider = vertex.create(
        settings(fake, add_watermark="false", person_generation="allow_adult"), deps
    )
    await provider.generate(upstream_call(MODEL))
    parameters = fake.requests[0].json["parameters"]
    assert parameters["addWatermark"] is False
    assert parameters["personGeneration"] == "allow_adult"
    with pytest.raises(CatalogError, match="add_watermark"):
        vertex.create(settings(fake, add_watermark="maybe"), deps)


def test_default_host_follows_the_location(deps: AdapterDeps) -> None:
    regional = vertex.create(
        ProviderSettings("v", "vertex", options={"project": "p", "location": "europe-west4"}),
        deps,
    )
    assert regional._prefix.startswith("https://europe-west4-aiplatform.googleapis.com/v1/")
    world = vertex.create(
        ProviderSettings("v", "vertex", options={"project": "p", "location": "global"}), deps
    )
    assert world._prefix.startswith("https://aiplatform.googleapis.com/v1/projects/p/")


@pytest.mark.parametrize(
    ("options", "env", "missing"),
    [
        ({"location": "us-central1"}, {}, "project"),
        ({"project": "p"}, {}, "location"),
    ],
)
def test_project_and_location_are_required(
    deps: AdapterDeps, options: dict[str, str], env: dict[str, str], missing: str
) -> None:
    with_token = AdapterDeps(deps.http, deps.download, {"VERTEX_ACCESS_TOKEN": TOKEN, **env})
    with pytest.raises(MissingCredentials, match=missing):
        vertex.create(ProviderSettings("v", "vertex", options=options), with_token)


async def test_project_and_location_from_the_environment(
    fake: GoogleFake, deps: AdapterDeps
) -> None:
    env = {
        "VERTEX_ACCESS_TOKEN": TOKEN,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "GOOGLE_CLOUD_LOCATION": "us-central1",
    }
    provider = vertex.create(
        ProviderSettings("v", "vertex", base_url=fake.base_url),
        AdapterDeps(deps.http, deps.download, env),
    )
    await provider.generate(upstream_call(MODEL))
    assert fake.requests[0].path == PATH


def test_a_named_token_variable_must_be_set(fake: GoogleFake, deps: AdapterDeps) -> None:
    with pytest.raises(MissingCredentials, match="MY_VERTEX_TOKEN"):
        vertex.create(settings(fake, api_key_env="MY_VERTEX_TOKEN"), deps)


def process_env(deps: AdapterDeps, monkeypatch: pytest.MonkeyPatch) -> AdapterDeps:
    """The process's own environment (what production passes), without a token in it."""
    for name in ("VERTEX_ACCESS_TOKEN", "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION"):
        monkeypatch.delenv(name, raising=False)
    return AdapterDeps(deps.http, deps.download, os.environ)


def test_without_token_or_google_auth(
    fake: GoogleFake, deps: AdapterDeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "google.auth", None)
    with pytest.raises(MissingCredentials, match="google-auth is not installed"):
        vertex.create(settings(fake), process_env(deps, monkeypatch))


def test_without_token_or_default_credentials(
    fake: GoogleFake, deps: AdapterDeps, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    with pytest.raises(MissingCredentials, match="no Google application default credentials"):
        vertex.create(settings(fake), process_env(deps, monkeypatch))


@functools.cache
def private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def service_account_file(tmp_path: Path, token_uri: str) -> Path:
    pem = private_key_pem()
    path = tmp_path / "service-account.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": "fake-key-id",
                "private_key": pem,
                "client_email": "imagegate@proj-1.iam.gserviceaccount.com",
                "client_id": "1234567890",
                "token_uri": token_uri,
            }
        )
    )
    return path


@pytest.fixture
def adc(fake: GoogleFake, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Application default credentials: a service-account key whose token endpoint is the fake."""
    path = service_account_file(tmp_path, f"{fake.base_url}/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))


@pytest.mark.usefixtures("adc")
def test_a_given_environment_never_falls_back_to_the_machines_credentials(
    fake: GoogleFake, deps: AdapterDeps
) -> None:
    # Default credentials exist on this "machine", but the registry was handed a mapping.
    with pytest.raises(MissingCredentials, match="VERTEX_ACCESS_TOKEN is not set"):
        vertex.create(settings(fake), AdapterDeps(deps.http, deps.download, {}))


@pytest.mark.usefixtures("adc")
async def test_default_credentials_fetch_a_token_once_for_concurrent_calls(
    fake: GoogleFake, deps: AdapterDeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = process_env(deps, monkeypatch)
    # No project option: it comes from the credentials.
    provider = vertex.create(
        ProviderSettings("v", "vertex", fake.base_url, options={"location": "us-central1"}), empty
    )
    try:
        results = await asyncio.gather(*(provider.generate(upstream_call(MODEL)) for _ in range(3)))
        assert [len(r.images) for r in results] == [1, 1, 1]
        assert fake.token_grants == 1
        assert {seen.headers["Authorization"] for seen in fake.requests[1:]} == {f"Bearer {TOKEN}"}
        assert fake.requests[-1].path == PATH
    finally:
        await provider.aclose()


@pytest.mark.usefixtures("adc")
async def test_default_credentials_refresh_a_stale_token(
    fake: GoogleFake, deps: AdapterDeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.token_lifetime_s = 60  # inside google-auth's refresh margin: stale at once
    provider = vertex.create(settings(fake), process_env(deps, monkeypatch))
    try:
        await provider.generate(upstream_call(MODEL))
        await provider.generate(upstream_call(MODEL))
        assert fake.token_grants == 2
    finally:
        await provider.aclose()


@pytest.mark.usefixtures("adc")
async def test_a_refused_token_grant_is_an_upstream_error(
    fake: GoogleFake, deps: AdapterDeps, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = service_account_file(tmp_path, f"{fake.base_url}/no-such-endpoint")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    provider = vertex.create(settings(fake), process_env(deps, monkeypatch))
    try:
        with pytest.raises(UpstreamError, match="Could not obtain a Google access token") as caught:
            await provider.generate(upstream_call(MODEL))
        assert not caught.value.retryable
    finally:
        await provider.aclose()


async def test_wrong_project_is_our_configuration(fake: GoogleFake, deps: AdapterDeps) -> None:
    provider = vertex.create(settings(fake, project="someone-else"), deps)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(upstream_call(MODEL))
    assert not isinstance(caught.value, UpstreamRejected)
    assert not caught.value.retryable


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
    provider: vertex.VertexImagen,
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
    assert TOKEN not in str(caught.value)
    assert TOKEN not in caplog.text


async def test_partial_filter_and_extra_images(
    provider: vertex.VertexImagen, fake: GoogleFake
) -> None:
    fake.filter_next = 1
    partial = await provider.generate(upstream_call(MODEL, n=2))
    assert [image.data for image in partial.images] == [image_bytes(seed=1)]
    fake.inject(Fault.EXTRA_IMAGES)
    extra = await provider.generate(upstream_call(MODEL, n=1))
    assert len(extra.images) == 3


async def test_a_large_reply_is_read_as_it_arrives(
    provider: vertex.VertexImagen, fake: GoogleFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = decoded_on_arrival(monkeypatch)
    images = [large_image(seed=i) for i in range(2)]
    fake.image_texts = [b64(image) for image in images]
    result = await provider.generate(upstream_call(MODEL, n=2))
    assert [image.data for image in result.images] == images
    assert decoded == images
