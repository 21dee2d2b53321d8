"""Adapter for Azure OpenAI image deployments (kind azure_openai).

`base_url` is the resource endpoint, as the SDK's `azure_endpoint`
(`https://RESOURCE.openai.azure.com`); unset, it is read from
`AZURE_OPENAI_ENDPOINT` as Azure's SDKs do, and a provider with neither is not
live (the start-up log says which is missing); a route's `upstream_model` is the
deployment name. The key travels in the `api-key` header
(`AZURE_OPENAI_API_KEY`, or the variable named by `api_key_env`).

Option `api_version` picks the URL form:
- a dated version (default `2025-04-01-preview`, the first that serves
  gpt-image-1 as well as dall-e-3):
  `POST {endpoint}/openai/deployments/{deployment}/images/generations?api-version=...`
- `v1`: the version-less v1 API, `POST {endpoint}/openai/v1/images/generations`
  with the deployment name as `model` in the body.

Bodies and replies are OpenAI's (openai_wire.py), streaming included (gpt-image
deployments stream a call of one image as OpenAI does). Azure's refusals: a 400 whose
`inner_error.code` is `ResponsibleAIPolicyViolation` (or code `contentFilter` /
`moderation_blocked`) is a safety refusal; 404 `DeploymentNotFound` is a
misconfigured route (fails over); 401/403 mean our key was refused.

A deployment name says nothing about the model behind it, so the family comes
from the catalog model, and `max_n` is 1 unless the deployment's name shows a
gpt-image or dall-e-2 model, or option `max_n` says otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from service.providers import openai_wire as wire
from service.providers.base import (
    AdapterDeps,
    MissingCredentials,
    Provider,
    ProviderResult,
    ProviderSettings,
    StreamEvent,
    UpstreamCall,
    generated_events,
)
from service.providers.http import credential
from service.providers.openai import option_max_n

DEFAULT_ENV = "AZURE_OPENAI_API_KEY"
ENDPOINT_ENV = "AZURE_OPENAI_ENDPOINT"
DEFAULT_API_VERSION = "2025-04-01-preview"
V1 = "v1"


class AzureOpenAIProvider:
    """One Azure OpenAI resource; routes name its deployments."""

    kind = "azure_openai"

    def __init__(
        self, settings: ProviderSettings, deps: AdapterDeps, endpoint: str, api_key: str
    ) -> None:
        self.id = settings.id
        self._endpoint = endpoint.rstrip("/")
        self._api_version = settings.options.get("api_version") or DEFAULT_API_VERSION
        self._auth = {"api-key": api_key}
        self._unknown_max_n = option_max_n(settings, 1)
        self._upstream = wire.Upstream(
            settings.id, deps.http, deps.download, settings.timeout_s, (api_key,)
        )

    def max_n(self, upstream_model: str) -> int:
        return wire.max_n_for(upstream_model, self._unknown_max_n)

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        url, body, params = self._request(call, wire.family(call))
        return await self._upstream.generate(url, self._headers(call), body, call.n, params)

    def stream(self, call: UpstreamCall) -> AsyncIterator[StreamEvent]:
        fam = wire.family(call)
        if not wire.streams(fam, call):
            return generated_events(self, call)
        url, body, params = self._request(call, fam)
        body = wire.stream_body(body, call)
        return self._upstream.stream(url, self._headers(call), body, call.n, params)

    def _headers(self, call: UpstreamCall) -> dict[str, str]:
        return {**self._auth, **wire.request_id_header("x-ms-client-request-id", call.request_id)}

    def _request(
        self, call: UpstreamCall, fam: str
    ) -> tuple[str, dict[str, Any], Mapping[str, str] | None]:
        """URL, body and query of the call in the configured API version's form."""
        if self._api_version == V1:
            url = f"{self._endpoint}/openai/v1/images/generations"
            return url, wire.request_body(call, fam, model=call.upstream_model), None
        deployment = quote(call.upstream_model, safe="")
        url = f"{self._endpoint}/openai/deployments/{deployment}/images/generations"
        return url, wire.request_body(call, fam, model=None), {"api-version": self._api_version}

    async def edit(self, call: UpstreamCall) -> ProviderResult:
        """The deployment's images/edits, multipart as OpenAI's (no variations on Azure)."""
        url, form, params = self._edit_request(call, wire.family(call), stream=False)
        return await self._upstream.upload(url, self._headers(call), form, call.n, params)

    def stream_edit(self, call: UpstreamCall) -> AsyncIterator[StreamEvent]:
        fam = wire.family(call)
        if not wire.streams(fam, call):
            return generated_events(self, call)
        url, form, params = self._edit_request(call, fam, stream=True)
        return self._upstream.stream(url, self._headers(call), form, call.n, params)

    def _edit_request(
        self, call: UpstreamCall, fam: str, *, stream: bool
    ) -> tuple[str, aiohttp.FormData, Mapping[str, str] | None]:
        if self._api_version == V1:
            url = f"{self._endpoint}/openai/v1/images/edits"
            return url, wire.edit_form(call, fam, call.upstream_model, stream=stream), None
        deployment = quote(call.upstream_model, safe="")
        url = f"{self._endpoint}/openai/deployments/{deployment}/images/edits"
        form = wire.edit_form(call, fam, None, stream=stream)
        return url, form, {"api-version": self._api_version}

    async def aclose(self) -> None:
        # The session and downloader belong to the registry.
        return None


def create(settings: ProviderSettings, deps: AdapterDeps) -> Provider:
    endpoint = settings.base_url or deps.env.get(ENDPOINT_ENV, "").strip()
    if not endpoint:
        raise MissingCredentials(f"base_url is not set in the catalog, nor {ENDPOINT_ENV}")
    key = credential(deps.env, settings.api_key_env or DEFAULT_ENV)
    return AzureOpenAIProvider(settings, deps, endpoint, key)
