"""Streamed generations: the events a caller is sent, and the images it has been handed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service import costs
from service.images import EXTENSIONS
from service.providers.base import CompletedImage, GeneratedImage, TokenUsage
from service.providers.dispatch import CallResult, Streamed
from service.requests import ImageRequest

# What an event's `quality` may say (OpenAI's enumeration, which typed clients
# check); a model's own qualities outside it ("standard", "hd") are "auto".
EVENT_QUALITIES = frozenset({"low", "medium", "high"})


@dataclass(frozen=True)
class ImageEvent:
    """One event as the transport sends it: a free preview, or a finished image."""

    completed: bool
    data: bytes
    created_at: int
    background: str
    output_format: str
    quality: str
    size: str
    # Previews only.
    partial_image_index: int | None = None
    # Finished images only: the usage reported with this image.
    usage: TokenUsage | None = None


# Hands an event to the transport; returns once it is handed over, raises if it cannot be.
Send = Callable[[ImageEvent], Awaitable[None]]


def image_event(request: ImageRequest, item: Streamed, now: float) -> ImageEvent:
    """The event for one streamed item, with the fields OpenAI's events always carry."""
    e = item.event
    image = e.image if isinstance(e, CompletedImage) else e
    usage = None
    if isinstance(e, CompletedImage):
        # The usage as the bill believes it (nonsense reported usage reads as zero).
        call = CallResult(item.route, 1, [e.image], e.usage)
        usage = costs.bill(request, [call], request.quote).usage
    return ImageEvent(
        completed=isinstance(e, CompletedImage),
        data=image.data,
        created_at=int(now),
        # What was rendered: "auto" and unset come out opaque, as in a unary response.
        background="transparent" if request.background == "transparent" else "opaque",
        output_format=EXTENSIONS.get(image.content_type, request.output_format),
        quality=request.quality if request.quality in EVENT_QUALITIES else "auto",
        size=request.size,
        partial_image_index=None if isinstance(e, CompletedImage) else e.index,
        usage=usage,
    )


class Delivered:
    """The finished images handed to the transport, per upstream call: what is charged."""

    def __init__(self) -> None:
        self._calls: dict[int, CallResult] = {}

    def add(self, item: Streamed) -> None:
        e = item.event
        if not isinstance(e, CompletedImage):
            return  # previews are free
        seen = self._calls.get(item.call)
        images: list[GeneratedImage] = [] if seen is None else seen.images
        usage = TokenUsage() if seen is None else seen.usage
        delivered = [*images, e.image]
        self._calls[item.call] = CallResult(item.route, len(delivered), delivered, usage + e.usage)

    @property
    def images(self) -> int:
        return sum(len(c.images) for c in self._calls.values())

    def calls(self) -> list[CallResult]:
        return list(self._calls.values())
