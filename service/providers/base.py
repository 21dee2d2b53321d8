"""The provider interface every adapter implements: what it is given and what it returns.

One adapter per provider *kind* (openai, azure_openai, google, vertex, bedrock,
stability, bfl, replicate, openai_compatible, local). A `[providers.ID]` table of
the catalog becomes one ProviderSettings and one adapter instance; the
dispatcher (dispatch.py) calls `generate` once per upstream call, after it has
split `n` into calls of at most `max_n(upstream_model)` images. Adapters that
can also edit or make variations add `edit(call)` / `variation(call)` (the
Editor and VariationMaker protocols); the call then carries the input images.
For a streamed request it calls `stream` instead where the adapter has one
(StreamingProvider: upstreams that stream, and the local renderer's previews);
for the others it wraps the operation's method, so every model can be streamed.

Adapters may import HTTP and vendor libraries (aiohttp, botocore, google-auth),
never grpc. They raise only service.errors: ContentPolicy for a safety refusal,
UpstreamRejected for an error the request itself caused, UpstreamError for the
rest (retryable or not).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

# Defined with the rest of the catalog's tables; re-exported for adapters.
from service.catalog_settings import ProviderSettings as ProviderSettings
from service.inputs import InputImage as InputImage
from service.requests import ImageRequest

if TYPE_CHECKING:
    import aiohttp


@dataclass(frozen=True)
class TokenUsage:
    """Tokens the upstream reports, in OpenAI's Images vocabulary; zero where it reports none."""

    input_text_tokens: int = 0
    input_image_tokens: int = 0
    output_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        return self.input_text_tokens + self.input_image_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            self.input_text_tokens + other.input_text_tokens,
            self.input_image_tokens + other.input_image_tokens,
            self.output_tokens + other.output_tokens,
        )


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes
    # MIME type of `data`, e.g. "image/png".
    content_type: str
    revised_prompt: str | None = None


@dataclass(frozen=True)
class ProviderResult:
    images: list[GeneratedImage]
    usage: TokenUsage = field(default_factory=TokenUsage)


@dataclass(frozen=True)
class UpstreamCall:
    """One call to one route: the validated request, for `n` of its images."""

    request: ImageRequest
    # The route's model id at the provider (an Azure deployment, a Bedrock model id, ...).
    upstream_model: str
    # Images this call must produce (<= the adapter's max_n for upstream_model).
    n: int
    # Sent to upstreams that accept a client request id.
    request_id: str = ""

    @property
    def images(self) -> tuple[InputImage, ...]:
        """Edits and variations: the input images, checked and decoded (service/inputs.py)."""
        return self.request.inputs

    @property
    def mask(self) -> InputImage | None:
        """Edits: a PNG whose fully transparent areas are where the first image is edited."""
        return self.request.mask


class Provider(Protocol):
    """Build the upstream request, call it, turn the reply into image bytes.

    An adapter never forwards a parameter the upstream would reject: the
    request was validated against the model's catalog entry, and the adapter
    maps or drops what its wire format has no field for.
    """

    id: str
    kind: str

    def max_n(self, upstream_model: str) -> int:
        """Most images one upstream call may ask for (dall-e-3: 1, Imagen: 4, ...)."""
        ...

    async def generate(self, call: UpstreamCall) -> ProviderResult: ...

    async def aclose(self) -> None: ...


class Editor(Protocol):
    """An adapter that edits: `call.images` (and `call.mask`) with `call.request.prompt`."""

    async def edit(self, call: UpstreamCall) -> ProviderResult: ...


class VariationMaker(Protocol):
    """An adapter that makes variations of `call.images[0]`."""

    async def variation(self, call: UpstreamCall) -> ProviderResult: ...


def operation(
    provider: Provider, name: str
) -> Callable[[UpstreamCall], Awaitable[ProviderResult]] | None:
    """The adapter's method for a request's operation (generate, edit, variation), or None
    if the adapter has none: a route whose provider cannot serve the operation is skipped."""
    method = getattr(provider, name, None)
    return method if callable(method) else None


@dataclass(frozen=True)
class PartialImage:
    """A preview of the image being made, streamed before it (free for the caller)."""

    data: bytes
    content_type: str
    # 0-based, in the order the previews come.
    index: int


@dataclass(frozen=True)
class CompletedImage:
    """One finished image of a streamed call, with the usage reported for it."""

    image: GeneratedImage
    # Where the upstream reports usage once per call, the call's first image carries it.
    usage: TokenUsage = field(default_factory=TokenUsage)


StreamEvent = PartialImage | CompletedImage


@runtime_checkable
class StreamingProvider(Provider, Protocol):
    """A provider that can stream: optional; the dispatcher wraps `generate` for the rest."""

    def stream(self, call: UpstreamCall) -> AsyncIterator[StreamEvent]:
        """Previews (`call.request.partial_images` at most, none when call.n > 1), then
        one CompletedImage per image as each is ready. One upstream call, as `generate`."""
        ...


async def generated_events(provider: Provider, call: UpstreamCall) -> AsyncIterator[StreamEvent]:
    """The operation's one answer (generate, edit, variation) as completed events: the
    stream of a call whose upstream does not stream (the dispatcher's default, and
    adapters' for such models)."""
    run = operation(provider, call.request.operation)
    assert run is not None, "the dispatcher skips routes that cannot serve the operation"
    result = await run(call)
    for i, image in enumerate(result.images):
        # The call's usage rides on its first image, so the events add up to it.
        yield CompletedImage(image, result.usage if i == 0 else TokenUsage())


class Downloader(Protocol):
    """Fetches an image from a URL an upstream returned (download.py: host allowlist,
    no private addresses unless listed, size cap, timeout, decode check)."""

    async def fetch(self, url: str) -> tuple[bytes, str]:
        """The image bytes and their MIME type, or UpstreamError."""
        ...


@dataclass(frozen=True)
class AdapterDeps:
    """What the registry hands each adapter factory: `create(settings, deps) -> Provider`."""

    # One pooled session per provider, closed by the registry, not by the adapter.
    http: aiohttp.ClientSession
    download: Downloader
    # Where credentials come from (os.environ in production, a dict in tests).
    env: Mapping[str, str]


class MissingCredentials(Exception):
    """A provider cannot be built: its credential is not in the environment.

    Raised at start-up by an adapter factory; the models routed only to such
    providers are not served. The message names the variable, never a value.
    """
