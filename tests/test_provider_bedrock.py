"""The Bedrock adapter against the fake Bedrock runtime: SigV4 checked, bodies per family."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, RefreshableCredentials
from yarl import URL

from service import awslog
from service.errors import ContentPolicy, UpstreamError, UpstreamRejected
from service.providers import bedrock
from service.providers.base import AdapterDeps, MissingCredentials, ProviderSettings
from service.providers.download import SafeDownloader
from tests.fakes.base import Fault, image_bytes
from tests.fakes.bedrock import BLOCKED_WORD, INPUT_FILTER, OUTPUT_FILTER, BedrockFake
from tests.fakes.calls import model_spec, upstream_call
from tests.large_replies import NOT_BASE64, SMALL_NOT_BASE64, b64, decoded_on_arrival, large_image

ACCESS_KEY = "AKIAFAKEIMAGEGATE0001"
SECRET_KEY = "fakeSecret/imagegate+Key0123456789abcdefgh"
SESSION_TOKEN = "FakeSessionToken//imagegate+0123456789=="
NOVA = "amazon.nova-canvas-v1:0"
CORE = "stability.stable-image-core-v1:1"
ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    "AWS_REGION": "us-east-1",
}
SECRETS = (SECRET_KEY, SESSION_TOKEN)


@pytest.fixture
async def fake() -> AsyncIterator[BedrockFake]:
    fake = BedrockFake(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, region="us-east-1")
    fake.stall_s = 5.0
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def deps(http: aiohttp.ClientSession) -> AsyncIterator[AdapterDeps]:
    download = SafeDownloader("bedrock", ["127.0.0.1"])
    yield AdapterDeps(http=http, download=download, env=dict(ENV))
    await download.aclose()


def settings(fake: BedrockFake, **options: str) -> ProviderSettings:
    return ProviderSettings("bedrock", "bedrock", fake.base_url, timeout_s=1.0, options=options)


def with_env(deps: AdapterDeps, **env: str) -> AdapterDeps:
    return AdapterDeps(deps.http, deps.download, {**ENV, **env})


@pytest.fixture
def provider(fake: BedrockFake, deps: AdapterDeps) -> bedrock.BedrockImages:
    return bedrock.create(settings(fake), deps)


async def test_nova_canvas_request_on_the_wire(
    provider: bedrock.BedrockImages, fake: BedrockFake
) -> None:
    result = await provider.generate(upstream_call(NOVA, n=2, size="1792x1024", quality="hd"))
    (seen,) = fake.requests
    assert seen.method == "POST"
    assert seen.path == f"/model/{NOVA}/invoke"
    auth = seen.headers["Authorization"]
    today = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    assert auth.startswith(
        f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{today}/us-east-1/bedrock/aws4_request, "
    )
    assert "SignedHeaders=accept;content-type;host;x-amz-date;x-amz-security-token," in auth
    assert seen.headers["X-Amz-Security-Token"] == SESSION_TOKEN
    assert seen.json == {
        "taskType": "TEXT_IMAGE",
        "textToImageParams": {"text": "a lighthouse at dusk"},
        "imageGenerationConfig": {
            "numberOfImages": 2,
            "width": 1792,
            "height": 1024,
            "quality": "premium",
        },
    }
    assert [image.data for image in result.images] == [image_bytes(seed=i) for i in range(2)]
    assert {image.content_type for image in result.images} == {"image/png"}
    assert provider.max_n(NOVA) == 5


async def test_model_id_is_percent_encoded_as_boto3_sends_it(
    provider: bedrock.BedrockImages, fake: BedrockFake
) -> None:
    seen_raw: list[str] = []
    original = fake._check_signature

    def spy(request: aiohttp.web.Request, body: bytes) -> aiohttp.web.Response | None:
        seen_raw.append(request.raw_path)
        return original(request, body)

    fake._check_signature = spy  # type: ignore[method-assign]
    await provider.generate(upstream_call(NOVA))
    assert seen_raw == ["/model/amazon.nova-canvas-v1%3A0/invoke"]


async def test_stability_request_on_the_wire(
    provider: bedrock.BedrockImages, fake: BedrockFake
) -> None:
    result = await provider.generate(upstream_call(CORE, size="1536x1024", output_format="jpeg"))
    assert fake.requests[0].json == {
        "prompt": "a lighthouse at dusk",
        "mode": "text-to-image",
        "aspect_ratio": "3:2",
        "output_format": "jpeg",
    }
    assert result.images[0].data == image_bytes("JPEG", seed=0)
    assert result.images[0].content_type == "image/jpeg"
    assert provider.max_n(CORE) == 1
    with pytest.raises(UpstreamRejected) as caught:
        await provider.generate(upstream_call(CORE, output_format="webp"))
    assert caught.value.param == "output_format"


async def test_catalog_family_decides_the_body(
    provider: bedrock.BedrockImages, fake: BedrockFake
) -> None:
    # An inference-profile id says nothing useful; the catalog's family does.
    spec = model_spec(family="stability")
    with pytest.raises(UpstreamError, match="refused the model id"):
        await provider.generate(upstream_call("us.some-profile", model=spec))
    assert "mode" in fake.requests[0].json
    with pytest.raises(UpstreamError, match="not one of the image families"):
        await provider.generate(upstream_call("meta.llama3-70b-instruct-v1:0"))


@pytest.mark.parametrize(
    ("env", "region", "kind"),
    [
        ({"AWS_SECRET_ACCESS_KEY": "another-secret"}, "us-east-1", "InvalidSignatureException"),
        ({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000"}, "us-east-1", "UnrecognizedClientException"),
        ({"AWS_SESSION_TOKEN": "expired-token"}, "us-east-1", "UnrecognizedClientException"),
        ({}, "eu-west-1", "InvalidSignatureException"),
    ],
)
async def test_a_bad_signature_is_refused_by_the_fake_and_fails_over(
    fake: BedrockFake,
    deps: AdapterDeps,
    caplog: pytest.LogCaptureFixture,
    env: dict[str, str],
    region: str,
    kind: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = bedrock.create(settings(fake, region=region), with_env(deps, **env))
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(upstream_call(NOVA))
    assert "refused the gateway's credentials (HTTP 403)" in caught.value.message
    assert not caught.value.retryable
    assert f"HTTP 403 {kind}" in caplog.text
    assert all(secret not in caplog.text for secret in (*SECRETS, *env.values()))


async def test_the_fake_refuses_a_body_changed_after_signing(
    fake: BedrockFake, http: aiohttp.ClientSession
) -> None:
    url = f"{fake.base_url}/model/amazon.nova-canvas-v1%3A0/invoke"
    signed = AWSRequest("POST", url, data=b'{"taskType": "TEXT_IMAGE"}', headers={})
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN), "bedrock", "us-east-1").add_auth(
        signed
    )
    tampered = b'{"taskType": "TEXT_IMAGE", "x": 1}'
    async with http.post(
        URL(url, encoded=True), data=tampered, headers=dict(signed.headers)
    ) as response:
        assert response.status == 403
        assert response.headers["x-amzn-ErrorType"].startswith("InvalidSignatureException:")
    async with http.post(
        URL(url, encoded=True), data=signed.body, headers=dict(signed.headers)
    ) as response:
        # The untouched request passes the signature check (and then fails validation).
        assert response.status == 400
        assert response.headers["x-amzn-ErrorType"].startswith("ValidationException:")


def test_region_and_credential_sources(fake: BedrockFake, deps: AdapterDeps) -> None:
    no_region = {k: v for k, v in ENV.items() if k != "AWS_REGION"}
    with pytest.raises(MissingCredentials, match="region"):
        bedrock.create(settings(fake), AdapterDeps(deps.http, deps.download, no_region))
    default_region = AdapterDeps(
        deps.http, deps.download, {**no_region, "AWS_DEFAULT_REGION": "us-west-2"}
    )
    assert bedrock.create(settings(fake), default_region)._region == "us-west-2"
    assert bedrock.create(settings(fake, region="eu-west-1"), deps)._region == "eu-west-1"
    endpoint = bedrock.create(ProviderSettings("b", "bedrock"), deps)._endpoint
    assert endpoint == "https://bedrock-runtime.us-east-1.amazonaws.com"


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A process environment with no AWS credentials, files under tmp_path, no metadata."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return tmp_path / "credentials"


def test_no_credentials_anywhere(fake: BedrockFake, deps: AdapterDeps, machine: Path) -> None:
    process = AdapterDeps(deps.http, deps.download, os.environ)
    with pytest.raises(MissingCredentials, match="no AWS credentials found"):
        bedrock.create(settings(fake), process)


@pytest.fixture
def shared_credentials(machine: Path) -> None:
    machine.write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        f"aws_session_token = {SESSION_TOKEN}\n"
    )


@pytest.mark.usefixtures("shared_credentials")
async def test_the_rest_of_the_chain_serves_the_process_environment(
    fake: BedrockFake, deps: AdapterDeps
) -> None:
    provider = bedrock.create(settings(fake), AdapterDeps(deps.http, deps.download, os.environ))
    assert len((await provider.generate(upstream_call(NOVA))).images) == 1
    # A mapping handed to the registry (a test's) is the whole truth: no files, no metadata.
    region_only = AdapterDeps(deps.http, deps.download, {"AWS_REGION": "us-east-1"})
    with pytest.raises(MissingCredentials, match="no AWS credentials found"):
        bedrock.create(settings(fake), region_only)


def test_without_botocore(
    fake: BedrockFake, deps: AdapterDeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "botocore.credentials", None)
    with pytest.raises(MissingCredentials, match="botocore is not installed"):
        bedrock.create(settings(fake), deps)


async def test_refreshing_credentials_refresh_off_the_event_loop(
    provider: bedrock.BedrockImages,
) -> None:
    loop_thread = threading.get_ident()
    refresh_threads: list[int] = []

    def refresh() -> dict[str, str]:
        refresh_threads.append(threading.get_ident())
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        return {
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "token": SESSION_TOKEN,
            "expiry_time": expiry.isoformat(),
        }

    stale = {**refresh(), "expiry_time": "2000-01-01T00:00:00+00:00"}
    refresh_threads.clear()
    provider._credentials = RefreshableCredentials.create_from_metadata(
        stale, refresh_using=refresh, method="test"
    )
    result = await provider.generate(upstream_call(NOVA))
    assert len(result.images) == 1
    assert refresh_threads and loop_thread not in refresh_threads


async def test_botocore_signing_log_never_shows_the_session_token(
    provider: bedrock.BedrockImages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    signing_log = logging.getLogger("botocore.auth")
    ours = [f for f in signing_log.filters if isinstance(f, awslog.NoSigningDebug)]
    for f in ours:
        signing_log.removeFilter(f)
    try:
        # Unfiltered, botocore's signer writes the canonical request, token included.
        provider._sign("https://bedrock-runtime.us-east-1.amazonaws.com/model/x/invoke", b"{}")
        assert SESSION_TOKEN in caplog.text
    finally:
        for f in ours:
            signing_log.addFilter(f)
    caplog.clear()
    await provider.generate(upstream_call(NOVA))
    assert SESSION_TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (408, "ModelTimeoutException", True),
        (429, "ThrottlingException", True),
        (429, "ModelNotReadyException", True),
        (500, "InternalServerException", True),
        (503, "ServiceUnavailableException", True),
        (424, "ModelErrorException", True),
        (403, "AccessDeniedException", False),
        (404, "ResourceNotFoundException", False),
        (400, "ServiceQuotaExceededException", False),
    ],
)
async def test_bedrock_error_types(
    provider: bedrock.BedrockImages, fake: BedrockFake, status: int, kind: str, retryable: bool
) -> None:
    fake.errors.append((status, kind, "Something went wrong."))
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(upstream_call(NOVA))
    # None of these is the caller's fault: never a 400 for them, always another route.
    assert not isinstance(caught.value, UpstreamRejected)
    assert caught.value.retryable is retryable


async def test_input_content_filter_is_a_safety_refusal(provider: bedrock.BedrockImages) -> None:
    with pytest.raises(ContentPolicy) as caught:
        await provider.generate(upstream_call(NOVA, prompt=f"a {BLOCKED_WORD}"))
    assert caught.value.message == INPUT_FILTER


async def test_output_filter_on_a_200(provider: bedrock.BedrockImages, fake: BedrockFake) -> None:
    fake.filter_next = 2
    with pytest.raises(ContentPolicy) as caught:
        await provider.generate(upstream_call(NOVA, n=2))
    assert caught.value.message == OUTPUT_FILTER
    fake.filter_next = 1
    partial = await provider.generate(upstream_call(NOVA, n=3))
    assert [image.data for image in partial.images] == [image_bytes(seed=i) for i in range(2)]


async def test_stability_filters(provider: bedrock.BedrockImages, fake: BedrockFake) -> None:
    with pytest.raises(ContentPolicy, match="Filter reason: prompt"):
        await provider.generate(upstream_call(CORE, prompt=f"a {BLOCKED_WORD}"))
    fake.filter_next = 1
    with pytest.raises(ContentPolicy, match="Filter reason: output image"):
        await provider.generate(upstream_call(CORE))


def test_stability_inference_error_is_retryable() -> None:
    reply = json.dumps({"seeds": [1], "finish_reasons": ["Inference error"], "images": []})
    with pytest.raises(UpstreamError, match="Inference error") as caught:
        bedrock.parse_reply(reply.encode(), "stability", "bedrock")
    assert caught.value.retryable
    with pytest.raises(UpstreamError, match="without images"):
        bedrock.parse_reply(b'{"images": [], "error": null}', "nova-canvas", "bedrock")


async def test_upstream_text_quoting_a_secret_is_scrubbed(
    provider: bedrock.BedrockImages, fake: BedrockFake
) -> None:
    fake.errors.append((400, "ValidationException", f"Bad input near {SECRET_KEY}"))
    with pytest.raises(UpstreamRejected) as caught:
        await provider.generate(upstream_call(NOVA))
    assert SECRET_KEY not in caught.value.message
    assert "[redacted]" in caught.value.message


FAULTS = [
    (NOVA, Fault.SERVER_ERROR, UpstreamError, True),
    (NOVA, Fault.RATE_LIMITED, UpstreamError, True),
    (NOVA, Fault.STALL, UpstreamError, True),
    (NOVA, Fault.RESET, UpstreamError, True),
    (NOVA, Fault.MALFORMED, UpstreamError, False),
    (NOVA, Fault.AUTH, UpstreamError, False),
    (NOVA, Fault.SAFETY, ContentPolicy, None),
    (NOVA, Fault.BAD_REQUEST, UpstreamRejected, None),
    (CORE, Fault.SAFETY, ContentPolicy, None),
    (CORE, Fault.BAD_REQUEST, UpstreamRejected, None),
    (CORE, Fault.MALFORMED, UpstreamError, False),
]


@pytest.mark.parametrize(("model", "fault", "error", "retryable"), FAULTS, ids=str)
async def test_fault(
    provider: bedrock.BedrockImages,
    fake: BedrockFake,
    caplog: pytest.LogCaptureFixture,
    model: str,
    fault: Fault,
    error: type[Exception],
    retryable: bool | None,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.inject(fault)
    with pytest.raises(error) as caught:
        await provider.generate(upstream_call(model))
    assert type(caught.value) is error
    if retryable is not None:
        assert isinstance(caught.value, UpstreamError)
        assert caught.value.retryable is retryable
    if fault is Fault.RATE_LIMITED:
        assert isinstance(caught.value, UpstreamError)
        assert caught.value.retry_after_s == 3
    for secret in SECRETS:
        assert secret not in str(caught.value)
        assert secret not in caplog.text


@pytest.mark.parametrize(("model", "asked", "got"), [(NOVA, 2, 4), (CORE, 1, 3)])
async def test_more_images_than_asked_are_not_an_error(
    provider: bedrock.BedrockImages, fake: BedrockFake, model: str, asked: int, got: int
) -> None:
    fake.inject(Fault.EXTRA_IMAGES)
    result = await provider.generate(upstream_call(model, n=asked))
    assert len(result.images) == got


@pytest.mark.parametrize(("model", "n"), [(NOVA, 3), (CORE, 1)])
async def test_a_large_reply_is_read_as_it_arrives(
    provider: bedrock.BedrockImages,
    fake: BedrockFake,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    n: int,
) -> None:
    decoded = decoded_on_arrival(monkeypatch)
    images = [large_image(seed=i) for i in range(n)]
    fake.image_texts = [b64(image) for image in images]
    result = await provider.generate(upstream_call(model, n=n))
    assert [image.data for image in result.images] == images
    assert {image.content_type for image in result.images} == {"image/png"}
    # The strings of the `images` array, taken from the reply as it came.
    assert decoded == images


@pytest.mark.parametrize("mangle", NOT_BASE64.values(), ids=NOT_BASE64)
@pytest.mark.parametrize("model", [NOVA, CORE])
async def test_a_large_image_not_base64_is_refused_as_a_small_one(
    provider: bedrock.BedrockImages,
    fake: BedrockFake,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    mangle: Callable[[str], str],
) -> None:
    # Nova: the second image of two is the bad one (the first, small, is text to decode).
    first = [image_bytes(seed=1)] if model == NOVA else []
    n = len(first) + 1
    fake.image_texts = [b64(image) for image in first] + [SMALL_NOT_BASE64]
    with pytest.raises(UpstreamError) as small:
        await provider.generate(upstream_call(model, n=n))
    decoded = decoded_on_arrival(monkeypatch)
    fake.image_texts = [b64(image) for image in first] + [mangle(b64(large_image()))]
    with pytest.raises(UpstreamError) as large:
        await provider.generate(upstream_call(model, n=n))
    assert decoded == [None]
    assert str(large.value) == str(small.value)
    assert "not valid base64" in str(large.value) and not large.value.retryable
