"""The built-in offline provider: deterministic images rendered locally with Pillow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from service.providers import local_edit
from service.providers.base import (
    AdapterDeps,
    CompletedImage,
    GeneratedImage,
    PartialImage,
    ProviderResult,
    ProviderSettings,
    StreamEvent,
    UpstreamCall,
)
from service.providers.local_render import CONTENT_TYPES, render, render_partial
from service.requests import EDIT, VARIATION

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
        loop = asyncio.get_running_loop()
        draw = _drawing(call)
        # All n at once; if the caller gives up, gather cancels the ones not started.
        blobs = await asyncio.gather(
            *(loop.run_in_executor(self._pool, partial(draw, index=i)) for i in range(call.n))
        )
        return ProviderResult(images=[_image(call, data) for data in blobs])

    async def edit(self, call: UpstreamCall) -> ProviderResult:
        """The prompt drawn over the input images, in the mask's transparent areas."""
        return await self.generate(call)

    async def variation(self, call: UpstreamCall) -> ProviderResult:
        """Deterministic variants of the input image."""
        return await self.generate(call)

    async def stream(self, call: UpstreamCall) -> AsyncIterator[StreamEvent]:
        """Cheap previews first (the backdrop, coarse to fine), then each image as it is
        drawn; previews only for a single image, as the dispatcher asks."""
        request = call.request
        preview = partial(
            render_partial,
            request.prompt,
            request.width,
            request.height,
            output_format=request.output_format,
            background=request.background,
            compression=request.output_compression,
        )
        async for event in self._stream(call, preview):
            yield event

    async def stream_edit(self, call: UpstreamCall) -> AsyncIterator[StreamEvent]:
        """As stream(); the previews are the input, coarse to fine."""
        request = call.request
        preview = partial(
            local_edit.preview,
            call.images[0].data,
            request.width,
            request.height,
            output_format=request.output_format,
            compression=request.output_compression,
        )
        async for event in self._stream(call, preview):
            yield event

    async def _stream(
        self, call: UpstreamCall, preview: partial[bytes]
    ) -> AsyncIterator[StreamEvent]:
        request = call.request
        loop = asyncio.get_running_loop()
        content_type = CONTENT_TYPES[request.output_format]
        steps = request.partial_images if call.n == 1 else 0
        for step in range(steps):
            drawn = await loop.run_in_executor(self._pool, partial(preview, step=step, steps=steps))
            yield PartialImage(drawn, content_type, step)
        draw = _drawing(call)
        renders = [loop.run_in_executor(self._pool, partial(draw, index=i)) for i in range(call.n)]
        try:
            for done in asyncio.as_completed(renders):
                yield CompletedImage(_image(call, await done))
        finally:
            for pending in renders:
                pending.cancel()  # renders not started yet never start

    async def aclose(self) -> None:
        # Drop queued renders, and wait for running ones off the loop so
        # shutdown leaves no worker threads behind.
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)


def _drawing(call: UpstreamCall) -> partial[bytes]:
    """What draws one image of the call (given its index), by the request's operation."""
    request = call.request
    if request.operation == EDIT:
        return partial(
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
    if request.operation == VARIATION:
        return partial(
            local_edit.variation,
            call.images[0].data,
            request.width,
            request.height,
            output_format=request.output_format,
            compression=request.output_compression,
        )
    return partial(
        render,
        request.prompt,
        request.width,
        request.height,
        output_format=request.output_format,
        quality=request.quality,
        background=request.background,
        compression=request.output_compression,
    )


def _image(call: UpstreamCall, data: bytes) -> GeneratedImage:
    request = call.request
    # A variation follows no prompt: nothing to report as revised.
    revised = None if request.operation == VARIATION else revised_prompt(request.prompt)
    return GeneratedImage(data, CONTENT_TYPES[request.output_format], revised)


def revised_prompt(prompt: str) -> str:
    """The prompt as drawn (whitespace collapsed), marked as an offline rendering."""
    return f"{' '.join(prompt.split())} {OFFLINE_NOTE}"
