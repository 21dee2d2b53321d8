"""The provider interface every adapter implements, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from service.requests import ImageRequest


@dataclass(frozen=True)
class TokenUsage:
    """Tokens the upstream reports; zero where it reports none."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


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


class Provider(Protocol):
    """Build the upstream request, call it, map its failures to service.errors.

    An adapter raises ContentPolicy for a refused prompt and UpstreamError for
    everything else that went wrong upstream; it never forwards a parameter
    the upstream would reject (validation already normalised the request).
    """

    name: str

    async def generate(self, request: ImageRequest) -> ProviderResult: ...

    async def aclose(self) -> None: ...
