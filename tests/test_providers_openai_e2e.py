"""openai, azure_openai and openai_compatible end to end: the official SDK through both REST
fronts, the real service and adapters, and fake OpenAI/Azure servers on 127.0.0.1.

The test catalog declares `openai` and `azure` under the shipped ids, so the shipped
dall-e-2, dall-e-3 and gpt-image-1 entries (prices, token prices, routes) are what is
tested, and nothing can reach the real vendors.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import openai
import pytest

from service.providers.download import MAX_DOWNLOAD_BYTES
from service.store.base import UsageRow
from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk
from tests.fakes.base import Fault
from tests.fakes.openai import FakeOpenAI
from tests.providers_harness import FAKE_ENV, FAST_DISPATCH, model, provider, provider_stack, route
from tests.rest import assert_error, call

OPENAI_KEY = FAKE_ENV["OPENAI_API_KEY"]
AZURE_KEY = FAKE_ENV["AZURE_OPENAI_API_KEY"]
ENV = {"OPENAI_API_KEY": OPENAI_KEY, "AZURE_OPENAI_API_KEY": AZURE_KEY}
SECRETS = (OPENAI_KEY, AZURE_KEY)
CREDIT = 1_000_000
PROMPT = "a lighthouse at dusk"
# Shipped list prices (micro-USD, 1024x1024).
DALL_E_2 = 20_000
DALL_E_3 = 40_000
COMPAT_PRICE = 1000
# Shipped gpt-image-1 token prices per 1M tokens, and the fake's token counts at "low".
TEXT_IN, OUTPUT = 5, 40
LOW_OUTPUT_TOKENS = 272
GPT_IMAGE = {
    "family": "gpt-image",
    "sizes": ["1024x1024"],
    "qualities": ["low", "medium", "high"],
    "default_quality": "low",
    "output_formats": ["png", "jpeg", "webp"],
    "token_prices": {"text_input": 5_000_000, "image_input": 10_000_000, "output": 40_000_000},
    "prices": {
        q: {"1024x1024": p} for q, p in (("low", 11000), ("medium", 42000), ("high", 167000))
    },
}


def gpt_image_cost(n: int, prompt: str = PROMPT) -> int:
    """What the fake's reported usage costs at the shipped token prices (one call)."""
    return (len(prompt) // 4) * TEXT_IN + LOW_OUTPUT_TOKENS * n * OUTPUT


@dataclass
class Fakes:
    oai: FakeOpenAI
    azure: FakeOpenAI
    compat: FakeOpenAI

    def reset(self) -> None:
        for fake in (self.oai, self.azure, self.compat):
            fake.faults.clear()
            fake.raw_reply = None


@pytest.fixture(scope="module")
async def fakes() -> AsyncIterator[Fakes]:
    deployments = {"dall-e-3": "dall-e-3", "gpt-image-1": "gpt-image-1", "house": "gpt-image-1"}
    made = Fakes(
        FakeOpenAI(openai_key=OPENAI_KEY, oversize_bytes=MAX_DOWNLOAD_BYTES + 1),
        FakeOpenAI(azure_key=AZURE_KEY, deployments=deployments),
        FakeOpenAI(openai_key=None, compatible_models={"flux-schnell"}, url_only=True),
    )
    for fake in (made.oai, made.azure, made.compat):
        fake.retry_after = 1
        await fake.start()
    yield made
    for fake in (made.oai, made.azure, made.compat):
        await fake.stop()


def _providers(fakes: Fakes) -> dict[str, dict[str, object]]:
    return {
        # Short timeouts: a stalled upstream costs a test two seconds, not minutes.
        "openai": provider("openai", fakes.oai.openai_base, timeout_s=2),
        "azure": provider("azure_openai", fakes.azure.base_url, timeout_s=2),
        "azure-v1": provider("azure_openai", fakes.azure.base_url, api_version="v1"),
        "compat": provider("openai_compatible", fakes.compat.openai_base, max_n=4),
    }


@pytest.fixture(scope="module")
async def fstack(tmp_path_factory: pytest.TempPathFactory, fakes: Fakes) -> AsyncIterator[Stack]:
    """Faults surface one route at a time: the breakers never open here."""
    models = {
        "solo-gpt": model(route("openai", "gpt-image-1"), **GPT_IMAGE),
        "solo-azure": model(
            route("azure", "dall-e-3"),
            family="dall-e-3",
            sizes=["1024x1024"],
            styles=["vivid", "natural"],
            prices={"standard": {"1024x1024": DALL_E_3}},
        ),
        "azure-missing": model(route("azure", "no-such-deployment"), family="dall-e-3"),
        "v1-gpt": model(route("azure-v1", "house"), **GPT_IMAGE),
        "flux-local": model(route("compat", "flux-schnell")),
    }
    async with provider_stack(
        tmp_path_factory.mktemp("openai-faults"),
        providers=_providers(fakes),
        models=models,
        env=ENV,
        dispatch=FAST_DISPATCH | {"breaker_failures": 1000},
    ) as stack:
        yield stack


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def who(fstack: Stack, fakes: Fakes) -> Tenant:
    fakes.reset()
    return await make_tenant(fstack.service)


@pytest.fixture
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every log record of the test, tracebacks included, is free of the fake credentials."""
    caplog.set_level(logging.DEBUG)
    yield
    formatter = logging.Formatter()
    records = caplog.get_records("setup") + caplog.get_records("call")
    assert records
    for record in records:
        text = formatter.format(record)
        assert not any(secret in text for secret in SECRETS), text


async def last_usage(stack: Stack, tenant: Tenant) -> UsageRow:
    return (await stack.service.store.usage(tenant.account, 1))[0]


def b64_images(result: openai.types.ImagesResponse) -> list[bytes]:
    return [base64.b64decode(d.b64_json or "", validate=True) for d in result.data]


async def url_images(result: openai.types.ImagesResponse) -> list[bytes]:
    images = []
    for item in result.data:
        assert item.url and not item.b64_json
        reply = await call("GET", item.url)
        assert reply.status == 200
        images.append(reply.body)
    return images


# -- success ----------------------------------------------------------------------------


async def test_dall_e_2_b64_and_url(fstack: Stack, fakes: Fakes, front: str, who: Tenant) -> None:
    client = sdk(fstack.fronts[front], who.key)
    raw = await client.images.with_raw_response.generate(
        model="dall-e-2", prompt=PROMPT, n=2, size="1024x1024", response_format="b64_json"
    )
    images = b64_images(raw.parse())
    assert len(images) == 2 and images[0] != images[1]
    assert all(i.startswith(b"\x89PNG") for i in images)
    sent = fakes.oai.requests[-1]
    assert sent.json["response_format"] == "b64_json" and sent.json["n"] == 2
    assert sent.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    # OpenAI's request log and ours share the id.
    assert sent.headers["X-Client-Request-Id"] == raw.headers["x-request-id"]
    urls = await client.images.generate(model="dall-e-2", prompt=PROMPT, size="1024x1024")
    assert (await url_images(urls))[0].startswith(b"\x89PNG")
    # The upstream was asked for base64 both times: no OpenAI URL to fetch or to leak.
    assert fakes.oai.requests[-1].json["response_format"] == "b64_json"
    assert await balance(fstack.service, who.account) == CREDIT - 3 * DALL_E_2
    row = await last_usage(fstack, who)
    assert (row.provider, row.upstream_model, row.cost_micros) == ("openai", "dall-e-2", DALL_E_2)


async def test_gpt_image_charged_from_reported_tokens(
    fstack: Stack, fakes: Fakes, front: str, who: Tenant
) -> None:
    client = sdk(fstack.fronts[front], who.key)
    result = await client.images.generate(
        model="solo-gpt", prompt=PROMPT, n=2, quality="low", response_format="url"
    )
    assert len(await url_images(result)) == 2
    sent = fakes.oai.requests[-1].json
    assert "response_format" not in sent and sent["quality"] == "low"
    assert result.usage is not None and result.usage.output_tokens == 2 * LOW_OUTPUT_TOKENS
    assert result.usage.input_tokens == len(PROMPT) // 4
    assert await balance(fstack.service, who.account) == CREDIT - gpt_image_cost(2)


async def test_shipped_dall_e_3_revised_prompt(
    fstack: Stack, fakes: Fakes, front: str, who: Tenant
) -> None:
    client = sdk(fstack.fronts[front], who.key)
    result = await client.images.generate(
        model="dall-e-3", prompt=PROMPT, n=2, style="natural", response_format="b64_json"
    )
    # dall-e-3 makes one image per call: two calls, each asked for base64.
    sent = [r.json for r in fakes.oai.requests[-2:]]
    assert [s["n"] for s in sent] == [1, 1] and all(s["style"] == "natural" for s in sent)
    assert [d.revised_prompt for d in result.data] == [f"A detailed rendering of: {PROMPT}"] * 2
    assert await balance(fstack.service, who.account) == CREDIT - 2 * DALL_E_3


async def test_azure_deployment_and_v1_forms(
    fstack: Stack, fakes: Fakes, front: str, who: Tenant
) -> None:
    client = sdk(fstack.fronts[front], who.key)
    result = await client.images.generate(
        model="solo-azure", prompt=PROMPT, response_format="b64_json"
    )
    assert b64_images(result)[0].startswith(b"\x89PNG")
    sent = fakes.azure.requests[-1]
    assert sent.path == "/openai/deployments/dall-e-3/images/generations"
    assert sent.query == {"api-version": "2025-04-01-preview"}
    assert sent.headers["api-key"] == AZURE_KEY
    result = await client.images.generate(model="v1-gpt", prompt=PROMPT, response_format="url")
    assert len(await url_images(result)) == 1
    sent = fakes.azure.requests[-1]
    assert (sent.path, sent.json["model"]) == ("/openai/v1/images/generations", "house")
    assert await balance(fstack.service, who.account) == CREDIT - DALL_E_3 - gpt_image_cost(1)


async def test_compatible_server_urls_are_downloaded_and_rehosted(
    fstack: Stack, fakes: Fakes, front: str, who: Tenant
) -> None:
    client = sdk(fstack.fronts[front], who.key)
    before = len(fakes.compat.files)
    result = await client.images.generate(
        model="flux-local", prompt=PROMPT, n=2, response_format="b64_json"
    )
    made = list(fakes.compat.files.values())[before:]
    assert b64_images(result) == made
    assert "Authorization" not in fakes.compat.requests[-1].headers
    result = await client.images.generate(model="flux-local", prompt=PROMPT, response_format="url")
    url = result.data[0].url or ""
    # The client gets imagegate's own URL for the image, never the server's.
    assert url.startswith(fstack.fronts[front]) and fakes.compat.base_url not in url
    assert await url_images(result) == list(fakes.compat.files.values())[-1:]
    assert await balance(fstack.service, who.account) == CREDIT - 3 * COMPAT_PRICE


async def test_large_base64_reply_end_to_end(
    fstack: Stack, fakes: Fakes, front: str, who: Tenant
) -> None:
    # Read by the adapter as it arrives, spliced into the gRPC reply by the servicer.
    images = [b"\x89PNG\r\n\x1a\n" + random.Random(i).randbytes(700_000) for i in range(2)]
    items = [{"b64_json": base64.b64encode(image).decode(), "revised_prompt": "p"} for image in
             images]  # fmt: skip
    fakes.compat.raw_reply = json.dumps({"created": 1, "data": items}).encode()
    fakes.compat.raw_piece = 50_000
    client = sdk(fstack.fronts[front], who.key)
    result = await client.images.generate(
        model="flux-local", prompt=PROMPT, n=2, response_format="b64_json"
    )
    assert b64_images(result) == images
    assert [item.revised_prompt for item in result.data] == ["p", "p"]


# -- faults -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    faults: tuple[Fault, ...]
    model: str
    status: int
    # (type, code, param) of the error, or None for a success.
    error: tuple[str, str, str | None] | None = None
    text: str = ""
    fake: str = "oai"
    n: int = 1


UPSTREAM = ("upstream_error", "upstream_error", None)
POLICY = ("invalid_request_error", "content_policy_violation", None)
CASES = {
    "500 twice": Case((Fault.SERVER_ERROR,) * 2, "dall-e-2", 502, UPSTREAM, "HTTP 500"),
    "500 then retried": Case((Fault.SERVER_ERROR,), "dall-e-2", 200),
    "429 then retried": Case((Fault.RATE_LIMITED,), "dall-e-2", 200),
    "429 twice": Case((Fault.RATE_LIMITED,) * 2, "dall-e-2", 502, UPSTREAM, "HTTP 429"),
    "stall then retried": Case((Fault.STALL,), "dall-e-2", 200),
    "reset then retried": Case((Fault.RESET,), "dall-e-2", 200),
    "reset twice": Case((Fault.RESET,) * 2, "dall-e-2", 502, UPSTREAM, "could not be reached"),
    "malformed": Case((Fault.MALFORMED,), "dall-e-2", 502, UPSTREAM, "not JSON"),
    "401": Case((Fault.AUTH,), "dall-e-2", 502, UPSTREAM, "refused the gateway's credentials"),
    "dall-e safety": Case((Fault.SAFETY,), "dall-e-2", 400, POLICY, "our safety system"),
    "gpt-image safety": Case((Fault.SAFETY,), "solo-gpt", 400, POLICY, "safety_violations"),
    "bad request": Case(
        (Fault.BAD_REQUEST,),
        "dall-e-2",
        400,
        ("invalid_request_error", "invalid_value", "size"),
        "rejected the request",
    ),
    "url outside": Case((Fault.URL_OUTSIDE,), "dall-e-2", 502, UPSTREAM, "not allowed"),
    "url metadata": Case((Fault.URL_METADATA,), "dall-e-2", 502, UPSTREAM, "169.254.169.254"),
    "oversize": Case((Fault.OVERSIZE,), "dall-e-2", 502, UPSTREAM, "too large"),
    "extra images": Case((Fault.EXTRA_IMAGES,), "dall-e-2", 200, n=2),
    "azure safety": Case((Fault.SAFETY,), "solo-azure", 400, POLICY, "our safety system", "azure"),
    "azure 401": Case((Fault.AUTH,), "solo-azure", 502, UPSTREAM, "credentials", "azure"),
    "azure 500 twice": Case(
        (Fault.SERVER_ERROR,) * 2, "solo-azure", 502, UPSTREAM, "HTTP 500", "azure"
    ),
    "azure no deployment": Case((), "azure-missing", 502, UPSTREAM, "DeploymentNotFound"),
}
PRICES = {"dall-e-2": DALL_E_2, "solo-azure": DALL_E_3, "solo-gpt": gpt_image_cost(1)}


@pytest.mark.usefixtures("no_secret_in_logs")
@pytest.mark.parametrize("name", list(CASES))
async def test_fault(fstack: Stack, fakes: Fakes, front: str, who: Tenant, name: str) -> None:
    case = CASES[name]
    getattr(fakes, case.fake).inject(*case.faults)
    reply = await call(
        "POST",
        f"{fstack.fronts[front]}/v1/images/generations",
        key=who.key,
        json_body={
            "model": case.model,
            "prompt": PROMPT,
            "n": case.n,
            "response_format": "b64_json",
        },
    )
    assert not any(secret.encode() in reply.body for secret in SECRETS)
    if case.error is None:
        assert reply.status == 200, reply.body[:300]
        assert len(reply.json()["data"]) == case.n
        charged = case.n * PRICES[case.model]
    else:
        error = assert_error(reply, case.status, *case.error)
        assert case.text in error["message"]
        charged = 0
    assert await balance(fstack.service, who.account) == CREDIT - charged
    assert not getattr(fakes, case.fake).faults  # every injected fault was met


async def test_fault_through_the_sdk_is_its_exception(
    fstack: Stack, fakes: Fakes, front: str, who: Tenant
) -> None:
    client = sdk(fstack.fronts[front], who.key)
    fakes.oai.inject(Fault.SAFETY)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.images.generate(model="solo-gpt", prompt=PROMPT)
    assert refused.value.code == "content_policy_violation"
    fakes.oai.inject(Fault.SERVER_ERROR, Fault.SERVER_ERROR)
    with pytest.raises(openai.InternalServerError) as failed:
        await client.images.generate(model="dall-e-2", prompt=PROMPT)
    assert failed.value.status_code == 502
    assert await balance(fstack.service, who.account) == CREDIT


# -- failover and the breaker -------------------------------------------------------------


@pytest.fixture(scope="module")
async def bstack(tmp_path_factory: pytest.TempPathFactory, fakes: Fakes) -> AsyncIterator[Stack]:
    """openai first, azure_openai second; per-front upstream names give each front's runs
    breakers of their own (the fake serves any gpt-image-* name)."""
    models = {}
    for front in FRONTS:
        for use in ("fo", "sf", "br"):
            models[f"{use}-{front}"] = model(
                route("openai", f"gpt-image-1-{use}-{front}"),
                route("azure", "gpt-image-1"),
                **GPT_IMAGE,
            )
    async with provider_stack(
        tmp_path_factory.mktemp("openai-failover"),
        providers=_providers(fakes),
        models=models,
        env=ENV,
        dispatch=FAST_DISPATCH,
    ) as stack:
        yield stack


@pytest.fixture
async def bwho(bstack: Stack, fakes: Fakes) -> Tenant:
    fakes.reset()
    return await make_tenant(bstack.service)


def openai_calls(fakes: Fakes, upstream_model: str) -> int:
    return sum(1 for r in fakes.oai.requests if (r.json or {}).get("model") == upstream_model)


def azure_calls(fakes: Fakes) -> int:
    return sum(1 for r in fakes.azure.requests if r.path.startswith("/openai/deployments/gpt-"))


async def test_failover_from_openai_to_azure_on_500s(
    bstack: Stack, fakes: Fakes, front: str, bwho: Tenant
) -> None:
    azure_before = azure_calls(fakes)
    fakes.oai.inject(Fault.SERVER_ERROR, Fault.SERVER_ERROR)
    result = await sdk(bstack.fronts[front], bwho.key).images.generate(
        model=f"fo-{front}", prompt=PROMPT, quality="low", response_format="b64_json"
    )
    assert len(b64_images(result)) == 1
    assert openai_calls(fakes, f"gpt-image-1-fo-{front}") == 2
    assert azure_calls(fakes) == azure_before + 1
    row = await last_usage(bstack, bwho)
    assert (row.provider, row.upstream_model, row.status) == ("azure", "gpt-image-1", "settled")
    assert await balance(bstack.service, bwho.account) == CREDIT - gpt_image_cost(1)


async def test_no_failover_on_a_safety_refusal(
    bstack: Stack, fakes: Fakes, front: str, bwho: Tenant
) -> None:
    azure_before = azure_calls(fakes)
    fakes.oai.inject(Fault.SAFETY)
    reply = await call(
        "POST",
        f"{bstack.fronts[front]}/v1/images/generations",
        key=bwho.key,
        json_body={"model": f"sf-{front}", "prompt": PROMPT},
    )
    error = assert_error(reply, 400, *POLICY)
    assert "safety system" in error["message"]
    assert openai_calls(fakes, f"gpt-image-1-sf-{front}") == 1
    assert azure_calls(fakes) == azure_before
    assert await balance(bstack.service, bwho.account) == CREDIT


async def test_breaker_opens_skips_and_probes_again(
    bstack: Stack, fakes: Fakes, front: str, bwho: Tenant
) -> None:
    client = sdk(bstack.fronts[front], bwho.key)
    upstream = f"gpt-image-1-br-{front}"

    async def served_by() -> str:
        await client.images.generate(model=f"br-{front}", prompt=PROMPT, response_format="url")
        return (await last_usage(bstack, bwho)).provider

    # Two failed attempts (breaker_failures = 2) open the breaker; azure serves.
    fakes.oai.inject(Fault.SERVER_ERROR, Fault.SERVER_ERROR)
    assert await served_by() == "azure"
    health = {(h.provider, h.upstream_model): h for h in bstack.service.core.dispatcher.health()}
    assert health["openai", upstream].state == "open"
    # Open: openai is skipped without a call.
    assert await served_by() == "azure"
    assert openai_calls(fakes, upstream) == 2
    # After the cooldown one probe goes to openai, succeeds, and closes the breaker.
    await asyncio.sleep(FAST_DISPATCH["breaker_cooldown_s"] + 0.1)
    assert await served_by() == "openai"
    assert openai_calls(fakes, upstream) == 3
    health = {(h.provider, h.upstream_model): h for h in bstack.service.core.dispatcher.health()}
    assert health["openai", upstream].state == "closed"
    assert await balance(bstack.service, bwho.account) == CREDIT - 3 * gpt_image_cost(1)
