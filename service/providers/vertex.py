"""Google Imagen on Vertex AI (kind `vertex`): the Imagen `:predict` call with an OAuth token.

`POST {base}/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:predict`,
base `https://{location}-aiplatform.googleapis.com` (`https://aiplatform.googleapis.com`
for location `global`). Body, reply and errors are Imagen's (google.py), plus
`addWatermark` when option `add_watermark` is set.

Where the token comes from, first match wins:
1. the variable `api_key_env` names (default `VERTEX_ACCESS_TOKEN`): a token
   someone else keeps fresh (`gcloud auth print-access-token`, a sidecar);
2. google-auth's application default credentials, when google-auth is
   installed (`pip install 'imagegate[vertex]'`) and the environment given is
   the process's own, refreshed in a thread before they expire.
`project` and `location` come from the provider's options, else from
`GOOGLE_CLOUD_PROJECT` / `GOOGLE_CLOUD_LOCATION` as google-genai reads them (the
project also from the default credentials). Whatever is missing is a
MissingCredentials naming it: the provider is not built and its models not served.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from service.catalog import CatalogError
from service.errors import UpstreamError
from service.providers.base import (
    AdapterDeps,
    MissingCredentials,
    ProviderResult,
    ProviderSettings,
    UpstreamCall,
)
from service.providers.google import (
    MAX_IMAGES,
    check_options,
    imagen_parameters,
    predict,
    predict_body,
)

DEFAULT_ENV = "VERTEX_ACCESS_TOKEN"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
BOOLEANS = {"true": True, "false": False}


class TokenSource(Protocol):
    async def headers(self) -> dict[str, str]:
        """The authorization headers for the next call."""
        ...

    def secrets(self) -> tuple[str, ...]:
        """What must never appear in a message: the current token."""
        ...

    async def aclose(self) -> None: ...


class StaticToken:
    """A bearer token from the environment, used as it is."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def secrets(self) -> tuple[str, ...]:
        return (self._token,)

    async def aclose(self) -> None:
        pass


class DefaultCredentials:
    """google-auth's application default credentials, refreshed in a thread when stale."""

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials
        self._lock = asyncio.Lock()
        self._transport: Any = None

    async def headers(self) -> dict[str, str]:
        # One refresh at a time; the others wait for its token instead of asking again.
        async with self._lock:
            if not self._credentials.valid:
                await asyncio.to_thread(self._refresh)
        headers: dict[str, str] = {}
        # apply() adds the bearer token and, for user credentials, x-goog-user-project.
        self._credentials.apply(headers)
        return headers

    def _refresh(self) -> None:
        import google.auth.exceptions
        from google.auth.transport.requests import Request

        if self._transport is None:
            self._transport = Request()
        try:
            self._credentials.refresh(self._transport)
        except google.auth.exceptions.GoogleAuthError as exc:
            # The library's text may quote the token endpoint's reply: keep only the kind.
            raise UpstreamError(
                f"Could not obtain a Google access token ({type(exc).__name__}).",
                retryable=isinstance(exc, google.auth.exceptions.TransportError),
            ) from None

    def secrets(self) -> tuple[str, ...]:
        token = self._credentials.token
        return (token,) if isinstance(token, str) and token else ()

    async def aclose(self) -> None:
        if self._transport is not None:
            await asyncio.to_thread(self._transport.session.close)


class VertexImagen:
    """Imagen models on Vertex AI, in one project and location."""

    kind = "vertex"

    def __init__(
        self,
        settings: ProviderSettings,
        deps: AdapterDeps,
        tokens: TokenSource,
        project: str,
        location: str,
    ) -> None:
        self.id = settings.id
        host = (
            "https://aiplatform.googleapis.com"
            if location == "global"
            else f"https://{location}-aiplatform.googleapis.com"
        )
        base = (settings.base_url or host).rstrip("/")
        self._prefix = (
            f"{base}/v1/projects/{quote(project, safe='')}/locations/{quote(location, safe='')}"
            "/publishers/google/models"
        )
        self._http = deps.http
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._options = settings.options
        self._watermark = _boolean(settings, "add_watermark")
        self._tokens = tokens

    def max_n(self, upstream_model: str) -> int:
        return MAX_IMAGES

    async def generate(self, call: UpstreamCall) -> ProviderResult:
        parameters = imagen_parameters(call, self._options)
        if self._watermark is not None:
            parameters["addWatermark"] = self._watermark
        url = f"{self._prefix}/{quote(call.upstream_model, safe='@')}:predict"
        headers = await self._tokens.headers()
        return await predict(
            self._http,
            self.id,
            url,
            headers,
            predict_body(call, parameters),
            self._timeout,
            secrets=self._tokens.secrets(),
        )

    async def aclose(self) -> None:
        await self._tokens.aclose()


def create(settings: ProviderSettings, deps: AdapterDeps) -> VertexImagen:
    check_options(settings)
    _boolean(settings, "add_watermark")
    variable = settings.api_key_env or DEFAULT_ENV
    token = deps.env.get(variable, "").strip()
    tokens: TokenSource
    adc_project = ""
    if token:
        tokens = StaticToken(token)
    elif settings.api_key_env:
        # A variable named on purpose is the only source wanted: say it is empty.
        raise MissingCredentials(f"{variable} is not set")
    elif deps.env is not os.environ:
        # Default credentials are the machine's (files, metadata server): asked only
        # when the environment given is the process's own; a test's is the whole truth.
        raise MissingCredentials(f"{variable} is not set")
    else:
        credentials, adc_project = _default_credentials(variable)
        tokens = DefaultCredentials(credentials)
    project = settings.options.get("project") or deps.env.get("GOOGLE_CLOUD_PROJECT") or adc_project
    location = settings.options.get("location") or deps.env.get("GOOGLE_CLOUD_LOCATION")
    if not project:
        raise MissingCredentials(
            f"provider '{settings.id}' has no Google Cloud project: set option 'project' "
            "or GOOGLE_CLOUD_PROJECT"
        )
    if not location:
        raise MissingCredentials(
            f"provider '{settings.id}' has no Vertex AI location: set option 'location' "
            "or GOOGLE_CLOUD_LOCATION"
        )
    return VertexImagen(settings, deps, tokens, project, location)


def _default_credentials(variable: str) -> tuple[Any, str]:
    """google-auth's application default credentials and their project, or MissingCredentials.

    May probe the GCE metadata server: the registry calls `create` in a thread.
    """
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError:
        raise MissingCredentials(
            f"{variable} is not set and google-auth is not installed for application "
            "default credentials (pip install 'imagegate[vertex]')"
        ) from None
    try:
        credentials, project = google.auth.default(scopes=list(SCOPES))
    except google.auth.exceptions.DefaultCredentialsError:
        raise MissingCredentials(
            f"{variable} is not set and no Google application default credentials were found"
        ) from None
    return credentials, project or ""


def _boolean(settings: ProviderSettings, key: str) -> bool | None:
    value: object = settings.options.get(key)
    if value is None or isinstance(value, bool):
        return value
    flag = BOOLEANS.get(str(value).strip().lower())
    if flag is None:
        raise CatalogError(f"provider {settings.id!r}: {key} must be true or false")
    return flag
