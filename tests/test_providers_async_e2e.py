"""Stability, BFL and Replicate end to end: the official SDK through both REST fronts, the real
service and adapters, and the fake upstreams on 127.0.0.1. Success as b64_json and as
imagegate's own URL, every fault's status and body, the balance after each, and no fake
credential in any log record or response."""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.adapter_kit import until
from tests.conftest import FRONTS, Stack, Tenant, balance, make_tenant, sdk
from tests.fakes.base import FakeUpstream, Fault
from tests.fakes.bfl import FakeBfl
from tests.fakes.replicate import FakeReplicate
from tests.fakes.stability import FakeStability
from tests.providers_harness import FAKE_ENV, UNIT_PRICE, model, provider, provider_stack, route
from tests.rest import Reply, assert_error, call

CREDIT = 1_000_000
# One attempt per route and breakers that never open: each fault's own answer, test by test.
DISPATCH = {
    "max_attempts": 1,
    "backoff_base_s": 0.001,
    "backoff_max_s": 0.005,
    "breaker_failures": 1000,
    "breaker_cooldown_s": 0.3,
}
# Long enough for a job (submit, one poll, download) on a busy machine; a stall costs this.
TIMEOUT_S = 1.5
SECRETS = [v for k, v in FAKE_ENV.items() if k != "AWS_REGION"]
MODELS = {"stability": "e2e-stable-core", "bfl": "e2e-flux-bfl", "replicate": "e2e-flux-replicate"}
KINDS = tuple(MODELS)


@dataclass
class Fakes:
    stability: FakeStability
    bfl: FakeBfl
    replicate: FakeReplicate

    def of(self, kind: str) -> FakeUpstream:
        fake: FakeUpstream = getattr(self, kind)
        return fake

    def served(self, kind: str) -> list[bytes]:
        """Every image the kind's fake handed out."""
        if kind == "stability":
            return self.stability.served
        outputs = self.bfl.outputs if kind == "bfl" else self.replicate.outputs
        return [data for data, _ in outputs.files.values()]

    def reset(self) -> None:
        for fake in (self.stability, self.bfl, self.replicate):
            fake.faults.clear()
        self.stability.safety = "moderation"
        self.bfl.moderation = "Content Moderated"


@pytest.fixture(scope="module")
async def fakes() -> AsyncIterator[Fakes]:
    made = Fakes(
        FakeStability(FAKE_ENV["STABILITY_API_KEY"]),
        FakeBfl(FAKE_ENV["BFL_API_KEY"]),
        FakeReplicate(FAKE_ENV["REPLICATE_API_TOKEN"]),
    )
    made.bfl.pending_polls = 0  # Ready at the first poll: keeps each job well inside TIMEOUT_S
    for fake in (made.stability, made.bfl, made.replicate):
        await fake.start()
    yield made
    for fake in (made.stability, made.bfl, made.replicate):
        await fake.stop()


@pytest.fixture(scope="module")
async def pstack(tmp_path_factory: pytest.TempPathFactory, fakes: Fakes) -> AsyncIterator[Stack]:
    sizes = ["1024x1024", "1024x768", "1536x1024"]
    capabilities: dict[str, Any] = {
        "sizes": sizes,
        "output_formats": ["png", "jpeg"],
        "prices": {"standard": dict.fromkeys(sizes, UNIT_PRICE)},
    }
    async with provider_stack(
        tmp_path_factory.mktemp("async-providers"),
        providers={
            kind: provider(kind, fakes.of(kind).base_url, timeout_s=TIMEOUT_S) for kind in KINDS
        },
        models={
            MODELS["stability"]: model(
                route("stability", "core"), family="stable-image-core", **capabilities
            ),
            MODELS["bfl"]: model(route("bfl", "flux-dev"), family="flux", **capabilities),
            MODELS["replicate"]: model(
                route("replicate", "black-forest-labs/flux-schnell"), family="flux", **capabilities
            ),
        },
        dispatch=DISPATCH,
    ) as stack:
        yield stack


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def who(pstack: Stack, fakes: Fakes) -> AsyncIterator[Tenant]:
    fakes.reset()
    yield await make_tenant(pstack.service)
    fakes.reset()


@pytest.fixture(autouse=True)
def _no_credential_in_logs(caplog: pytest.LogCaptureFixture) -> object:
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        text = logging.Formatter().format(record)
        leaked = [s for s in SECRETS if s in text]
        assert not leaked, f"credential in a log record of {record.name}"


def assert_clean(reply: Reply) -> None:
    """No fake credential in the status line's headers or body."""
    seen = reply.body.decode(errors="replace") + repr(dict(reply.headers))
    assert not [s for s in SECRETS if s in seen]


@pytest.mark.parametrize("kind", KINDS)
async def test_b64_json_and_url_deliver_the_upstream_images(
    pstack: Stack, fakes: Fakes, front: str, who: Tenant, kind: str
) -> None:
    client = sdk(pstack.fronts[front], who.key)
    result = await client.images.generate(
        model=MODELS[kind], prompt="a lighthouse", n=2, size="1024x768", response_format="b64_json"
    )
    images = [base64.b64decode(d.b64_json or "") for d in result.data]
    assert len(images) == 2 and all(image in fakes.served(kind) for image in images)

    linked = await client.images.generate(
        model=MODELS[kind], prompt="a lighthouse", size="1024x768"
    )
    [datum] = linked.data
    assert datum.url and datum.b64_json is None
    # imagegate's own link (re-hosted), never the provider's short-lived one.
    assert datum.url.startswith(pstack.fronts[front] + "/")
    assert not any(datum.url.startswith(f.base_url) for f in (fakes.bfl, fakes.replicate))
    image = await call("GET", datum.url)
    assert image.status == 200 and image.body in fakes.served(kind)
    assert await balance(pstack.service, who.account) == CREDIT - 3 * UNIT_PRICE


async def test_replicate_asks_for_n_in_one_prediction(
    pstack: Stack, fakes: Fakes, front: str, who: Tenant
) -> None:
    before = len(fakes.replicate.predictions)
    result = await sdk(pstack.fronts[front], who.key).images.generate(
        model=MODELS["replicate"], prompt="p", n=3, response_format="b64_json"
    )
    assert len(result.data) == 3
    [prediction] = list(fakes.replicate.predictions.values())[before:]
    assert prediction.input["num_outputs"] == 3


async def test_extra_outputs_are_dropped_and_not_charged(
    pstack: Stack, fakes: Fakes, front: str, who: Tenant
) -> None:
    fakes.replicate.inject(Fault.EXTRA_IMAGES)
    result = await sdk(pstack.fronts[front], who.key).images.generate(
        model=MODELS["replicate"], prompt="p", n=2, response_format="b64_json"
    )
    assert len(result.data) == 2
    assert await balance(pstack.service, who.account) == CREDIT - 2 * UNIT_PRICE


Setup = Callable[[Fakes], None]


def _filtered(fakes: Fakes) -> None:
    fakes.stability.safety = "filtered"


def _request_moderated(fakes: Fakes) -> None:
    fakes.bfl.moderation = "Request Moderated"


# (kind, fault, extra setup, (HTTP status, error code, param), a regex the message matches)
UPSTREAM = (502, "upstream_error", None)
SAFETY = (400, "content_policy_violation", None)
FAULTS: list[tuple[str, Fault, Setup | None, tuple[int, str, str | None], str]] = [
    *[
        (kind, fault, None, UPSTREAM, words)
        for kind in KINDS
        for fault, words in (
            (Fault.SERVER_ERROR, "HTTP 500"),
            (Fault.RATE_LIMITED, "HTTP 429"),
            # The adapter's request timeout or the dispatcher's, whichever fires first.
            (Fault.STALL, r"timed out|did not answer within"),
            (Fault.RESET, "could not be reached"),
            (Fault.MALFORMED, "not JSON"),
            (Fault.AUTH, "refused the gateway's credentials"),
        )
    ],
    ("stability", Fault.SAFETY, None, SAFETY, "content moderation system"),
    ("stability", Fault.SAFETY, _filtered, SAFETY, "filtered the generated image"),
    ("stability", Fault.BAD_REQUEST, None, (400, "invalid_value", "size"), "aspect_ratio"),
    ("bfl", Fault.SAFETY, None, SAFETY, "Content Moderated"),
    ("bfl", Fault.SAFETY, _request_moderated, SAFETY, "Request Moderated"),
    ("bfl", Fault.BAD_REQUEST, None, (400, "invalid_value", "size"), "multiple of 32"),
    ("replicate", Fault.SAFETY, None, SAFETY, "NSFW content detected"),
    ("replicate", Fault.BAD_REQUEST, None, (400, "invalid_value", "size"), "aspect_ratio"),
    *[
        (kind, fault, None, UPSTREAM, words)
        for kind in ("bfl", "replicate")
        for fault, words in (
            (Fault.POLL_FOREVER, r"did not answer within"),
            (Fault.URL_OUTSIDE, r"host not allowed for downloads \(localhost\)"),
            (Fault.URL_METADATA, r"\(169\.254\.169\.254\)"),
            (Fault.OVERSIZE, "too large"),
        )
    ],
]


@pytest.mark.parametrize(
    ("kind", "fault", "setup", "expected", "words"),
    FAULTS,
    ids=[f"{k}-{f.value}{'-' + s.__name__ if s else ''}" for k, f, s, _, _ in FAULTS],
)
async def test_fault_status_body_and_balance(
    pstack: Stack,
    fakes: Fakes,
    front: str,
    who: Tenant,
    kind: str,
    fault: Fault,
    setup: Setup | None,
    expected: tuple[int, str, str | None],
    words: str,
) -> None:
    if setup is not None:
        setup(fakes)
    fakes.of(kind).inject(fault)
    reply = await call(
        "POST",
        f"{pstack.fronts[front]}/v1/images/generations",
        key=who.key,
        json_body={"model": MODELS[kind], "prompt": "a lighthouse", "size": "1024x768"},
    )
    status, code, param = expected
    error_type = "upstream_error" if status == 502 else "invalid_request_error"
    error = assert_error(reply, status, error_type, code, param)
    assert re.search(words, error["message"]), error["message"]
    if status == 502:
        assert f"'{kind}'" in error["message"]  # names the provider, never its credential
    assert_clean(reply)
    assert await balance(pstack.service, who.account) == CREDIT
    if kind == "replicate" and fault is Fault.POLL_FOREVER:
        # Given up at the deadline: the prediction is cancelled too, not left to bill.
        last = list(fakes.replicate.predictions)[-1]
        await until(lambda: last in fakes.replicate.canceled)
    assert not fakes.of(kind).faults  # the fault was played, not left for the next test
