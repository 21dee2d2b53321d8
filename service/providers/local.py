"""The built-in offline provider: deterministic images rendered locally with Pillow."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from service.providers import local_edit
from service.providers.base import (
    AdapterDeps,
    GeneratedImage,
    ProviderResult,
    ProviderSettings,
    UpstreamCall,
)
from service.providers.local_render import CONTENT_TYPES, render

OFFLINE_NOTE = "(Rendered offline by imagegate's local renderer.)"


def create(settings: ProviderSettings, deps: AdapterDeps) -> LocalProvider:
    """The adapter factory: the local renderer needs no credential, session or downloads."""
    return LocalProvider(provider_id=settings.id)


class LocalProvider:
    """Renders in its own thread pool so image work never blocks the event loop."""

    kind = "local"

    def __init__(self, max_workers: int = 2, provider_id: str = "local") -> None:
        self.id = provider_id
        # A pool of its own, sized to the cores rather than the loop's default
        # executor: rendering is CPU-bound, and a burst of n=10 requests should
        # queue here instead of filling the executor other code relies on.
        # Pillow releases the GIL while it resizes, blends and encodes, so the
        # threads do run in parallel.
        self._pool = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="imagegate-local"
        )

    def max_n(self, upstream_model: str) -> int:
        return 10

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        request = call.request
        draw = partial(
            render,
            request.prompt,
            request.width,
            request.height,
            output_format=request.output_format,
            quality=request.quality,
            background=request.background,
            compression=request.output_compression,
        )
        return await self._run(call, draw, revised_prompt(request.prompt))

    async def edit(self, call: UpstreamCall) -> ProviderResult:
        """The prompt drawn over the input images, in the mask's transparent areas."""
        request = call.request
        draw = partial(
            local_edit.edit,
            request.prompt,
            [image.data for image in call.images],
            call.mask.data if call.mask is not None else None,
            request.width,
            request.height,
            output_format=request.output_format,
            quality=request.quality,
            background=request.background,
            compression=request.output_compression,
            fidelity=request.input_fidelity,
        )
        return await self._run(call, draw, revised_prompt(request.prompt))

    async def variation(self, call: UpstreamCall) -> ProviderResult:
        request = call.request
        draw = partial(
            local_edit.variation,
            call.images[0].data,
            request.width,
            request.height,
            output_format=request.output_format,
            compression=request.output_compression,
        )
        return await self._run(call, draw, None)

    async def _run(
        self, call: UpstreamCall, draw: Callable[..., bytes], revised: str | None
    ) -> ProviderResult:
        loop = asyncio.get_running_loop()
        # All n at once; if the caller gives up, gather cancels the ones not started.
        blobs = await asyncio.gather(
            *(loop.run_in_executor(self._pool, partial(draw, index=i)) for i in range(call.n))
        )
        content_type = CONTENT_TYPES[call.request.output_format]
        return ProviderResult(
            images=[GeneratedImage(data, content_type, revised) for data in blobs]
        )

    async def aclose(self) -> None:
        # Drop queued renders, and wait for running ones off the loop so
        # shutdown leaves no worker threads behind.
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)


def revised_prompt(prompt: str) -> str:
    """The prompt as drawn (whitespace collapsed), marked as an offline rendering."""
    return f"{' '.join(prompt.split())} {OFFLINE_NOTE}"
