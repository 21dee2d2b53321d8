"""Adapter for OpenAI's Images API and OpenAI-compatible servers (openai, openai_compatible).

`POST {base_url}/images/generations`, where `base_url` is what the OpenAI SDK
calls its base URL: up to and including `/v1` (default
`https://api.openai.com/v1`; an `openai_compatible` provider must set its own).

Credentials:
- `openai`: `Authorization: Bearer $OPENAI_API_KEY` (or the variable named by
  `api_key_env`); the provider is not served without it.
- `openai_compatible`: a key only if `api_key_env` names one. Many local servers
  (vLLM, LocalAI, ...) need none, and OPENAI_API_KEY is deliberately never used
  as a default: it would hand OpenAI's key to a third-party server. When
  `api_key_env` is set, the variable must be present, or the provider is not served.

The request body follows the model's family (the catalog's `family`, else the
model name): gpt-image models get their own fields and never `response_format`;
dall-e-2/dall-e-3 and unknown models of compatible servers are asked for
`b64_json`. Servers that answer with URLs anyway are fetched through the safe
downloader (list the server's host in `download_hosts`). Each call carries
`X-Client-Request-Id`, which OpenAI records with the request.

A streamed request (`stream`) streams upstream for gpt-image calls of one image
(OpenAI's `stream: true` with `partial_images`, events passed on as they come);
other calls are `generate`'s answer as completed events.

Option `max_n` (kind-specific key) overrides the images per call for models whose
name shows no family (default: 10 for openai, 1 for openai_compatible, since
many compatible servers ignore `n`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from service.catalog_settings import CatalogError
from service.providers import openai_wire as wire
from service.providers.base import (
    AdapterDeps,
    Provider,
    ProviderResult,
    ProviderSettings,
    StreamEvent,
    UpstreamCall,
    generated_events,
)
from service.providers.http import credential

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_ENV = "OPENAI_API_KEY"
COMPATIBLE = "openai_compatible"


class OpenAIProvider:
    """One OpenAI or OpenAI-compatible endpoint."""

    def __init__(self, settings: ProviderSettings, deps: AdapterDeps, api_key: str | None) -> None:
        self.id = settings.id
        self.kind = settings.kind
        base = (settings.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._base = base
        self._url = f"{base}/images/generations"
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._unknown_max_n = option_max_n(settings, 1 if settings.kind == COMPATIBLE else 10)
        self._upstream = wire.Upstream(
            settings.id,
            deps.http,
            deps.download,
            settings.timeout_s,
            (api_key,) if api_key else (),
        )

    def max_n(self, upstream_model: str) -> int:
        return wire.max_n_for(upstream_model, self._unknown_max_n)

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        body = wire.request_body(call, wire.family(call), model=call.upstream_model)
        return await self._upstream.generate(self._url, self._headers(call), body, call.n)

    def stream(self, call: UpstreamCall) -> AsyncIterator[StreamEvent]:
        fam = wire.family(call)
        if not wire.streams(fam, call):
            return generated_events(self, call)
        body = wire.stream_body(wire.request_body(call, fam, model=call.upstream_model), call)
        return self._upstream.stream(self._url, self._headers(call), body, call.n)

    def _headers(self, call: UpstreamCall) -> dict[str, str]:
        return {**self._auth, **wire.request_id_header("X-Client-Request-Id", call.request_id)}

    async def edit(self, call: UpstreamCall) -> ProviderResult:
        """POST {base_url}/images/edits, multipart (openai_wire.edit_form)."""
        form = wire.edit_form(call, wire.family(call), model=call.upstream_model)
        return await self._upstream.upload(
            f"{self._base}/images/edits", self._headers(call), form, call.n
        )

    def stream_edit(self, call: UpstreamCall) -> AsyncIterator[StreamEvent]:
        """A gpt-image edit of one image streams upstream (image_edit.* events)."""
        fam = wire.family(call)
        if not wire.streams(fam, call):
            return generated_events(self, call)
        form = wire.edit_form(call, fam, model=call.upstream_model, stream=True)
        url = f"{self._base}/images/edits"
        return self._upstream.stream(url, self._headers(call), form, call.n)

    async def variation(self, call: UpstreamCall) -> ProviderResult:
        """POST {base_url}/images/variations (dall-e-2), multipart."""
        form = wire.variation_form(call, model=call.upstream_model)
        url = f"{self._base}/images/variations"
        return await self._upstream.upload(url, self._headers(call), form, call.n)

    async def aclose(self) -> None:
        # The session and downloader belong to the registry.
        return None


def option_max_n(settings: ProviderSettings, default: int) -> int:
    """The `max_n` option (1-10) if set, else `default`; CatalogError if malformed."""
    raw = settings.options.get("max_n")
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 10:
        raise CatalogError(f"provider {settings.id!r}: max_n must be an integer from 1 to 10")
    return value


def create(settings: ProviderSettings, deps: AdapterDeps) -> Provider:
    if settings.kind == COMPATIBLE:
        if not settings.base_url:
            raise CatalogError(f"provider {settings.id!r}: kind {COMPATIBLE} needs a base_url")
        key = credential(deps.env, settings.api_key_env) if settings.api_key_env else None
    else:
        key = credential(deps.env, settings.api_key_env or DEFAULT_ENV)
    return OpenAIProvider(settings, deps, key)
