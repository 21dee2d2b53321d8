"""A scripted provider for dispatch, money and harness tests: it answers what the test queues.

It stands in for an upstream and its adapter together, so that failover,
breakers, deadlines and charging can be driven call by call. Load it as an
adapter module through `kind_modules` (e.g. {"openai_compatible":
"tests.fakes.scripted"}); like a real adapter it needs a credential
(`api_key_env`, default SCRIPTED_API_KEY).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from service.errors import ContentPolicy, UpstreamError, UpstreamRejected
from service.providers.base import (
    AdapterDeps,
    GeneratedImage,
    ProviderResult,
    ProviderSettings,
    TokenUsage,
    UpstreamCall,
)
from service.providers.http import credential
from tests.fakes.base import image_bytes

DEFAULT_ENV = "SCRIPTED_API_KEY"
PNG = image_bytes()


@dataclass(frozen=True)
class Step:
    """One answer: `images` (None = as many as asked), after `delay_s`, or `error`."""

    images: int | None = None
    error: Exception | None = None
    delay_s: float = 0.0
    usage: TokenUsage = field(default_factory=TokenUsage)


OK = Step()


def fail(retryable: bool = True, retry_after_s: float | None = None) -> Step:
    return Step(
        error=UpstreamError(
            "The upstream provider failed with HTTP 500",
            retryable=retryable,
            retry_after_s=retry_after_s,
        )
    )


def refuse() -> Step:
    return Step(error=ContentPolicy("Your request was rejected by the safety system."))


def reject() -> Step:
    return Step(error=UpstreamRejected("Invalid size for this model.", param="size"))


class ScriptedProvider:
    def __init__(self, provider_id: str = "scripted", max_n: int = 10) -> None:
        self.id = provider_id
        self.kind = "scripted"
        self._max_n = max_n
        self.calls: list[UpstreamCall] = []
        self.script: deque[Step] = deque()
        # What every call gets once the script is used up.
        self.default = OK
        self.closed = False

    def then(self, *steps: Step) -> ScriptedProvider:
        self.script.extend(steps)
        return self

    def max_n(self, upstream_model: str) -> int:
        return self._max_n

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        # The step is taken on entry, so parallel calls get the steps in call order.
        self.calls.append(call)
        step = self.script.popleft() if self.script else self.default
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        if step.error is not None:
            raise step.error
        count = call.n if step.images is None else step.images
        images = [GeneratedImage(PNG, "image/png", f"drawn by {self.id}") for _ in range(count)]
        return ProviderResult(images, step.usage)

    async def aclose(self) -> None:
        self.closed = True


def create(settings: ProviderSettings, deps: AdapterDeps) -> ScriptedProvider:
    credential(deps.env, settings.api_key_env or DEFAULT_ENV)
    return ScriptedProvider(settings.id, int(settings.options.get("max_n", "10")))
