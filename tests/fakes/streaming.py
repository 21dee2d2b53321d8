"""A scripted provider that streams: previews, images, errors and hangs as the test queues them.

Like tests/fakes/scripted.py (which it extends: `generate` and its steps work
as there) it stands in for an upstream and its adapter together; load it
through `kind_modules` (e.g. {"openai_compatible": "tests.fakes.streaming"}).
Each call to `stream` plays the next queued Scene.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from service.providers.base import (
    AdapterDeps,
    CompletedImage,
    GeneratedImage,
    PartialImage,
    ProviderSettings,
    StreamEvent,
    TokenUsage,
    UpstreamCall,
)
from service.providers.http import credential
from tests.fakes.scripted import DEFAULT_ENV, PNG, ScriptedProvider


@dataclass(frozen=True)
class Scene:
    """What one streamed call does, in this order: `partials` previews (None = as many
    as asked), `images` images (None = as asked), then raise `error` or, with `hang`,
    wait until cancelled."""

    partials: int | None = None
    images: int | None = None
    error: Exception | None = None
    hang: bool = False
    usage: TokenUsage = field(default_factory=TokenUsage)


class StreamingProvider(ScriptedProvider):
    def __init__(self, provider_id: str = "streaming", max_n: int = 10) -> None:
        super().__init__(provider_id, max_n)
        self.scenes: deque[Scene] = deque()
        self.default_scene = Scene()
        # Streamed calls that were cancelled while they waited (hang).
        self.cancelled = 0
        self.streamed: list[UpstreamCall] = []

    def play(self, *scenes: Scene) -> StreamingProvider:
        self.scenes.extend(scenes)
        return self

    async def stream(self, call: UpstreamCall) -> AsyncIterator[StreamEvent]:
        self.streamed.append(call)
        scene = self.scenes.popleft() if self.scenes else self.default_scene
        partials = call.request.partial_images if scene.partials is None else scene.partials
        for index in range(partials):
            yield PartialImage(PNG, "image/png", index)
        for i in range(call.n if scene.images is None else scene.images):
            image = GeneratedImage(PNG, "image/png", f"drawn by {self.id}")
            yield CompletedImage(image, scene.usage if i == 0 else TokenUsage())
        if scene.error is not None:
            raise scene.error
        if scene.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise


def create(settings: ProviderSettings, deps: AdapterDeps) -> StreamingProvider:
    credential(deps.env, settings.api_key_env or DEFAULT_ENV)
    return StreamingProvider(settings.id, int(settings.options.get("max_n", "10")))
