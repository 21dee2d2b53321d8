"""Building one adapter per declared provider, from its settings and the environment.

Each `[providers.ID]` table becomes one adapter made by its kind's module-level
`create(settings, deps)`, with a pooled HTTP session and a safe downloader of
its own. A provider that cannot be built (its credential is missing, or its
kind's adapter is not in this build) is not live: its routes are dropped and
one start-up line says why, naming the variable, never a value.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType

import aiohttp

from service.catalog_settings import ProviderSettings
from service.providers import propagation
from service.providers.base import AdapterDeps, MissingCredentials, Provider
from service.providers.download import SafeDownloader
from service.providers.http import scrub

log = logging.getLogger("imagegate.providers")

KIND_MODULES: Mapping[str, str] = {
    "openai": "service.providers.openai",
    "openai_compatible": "service.providers.openai",
    "azure_openai": "service.providers.azure",
    "google": "service.providers.google",
    "vertex": "service.providers.vertex",
    "bedrock": "service.providers.bedrock",
    "stability": "service.providers.stability",
    "bfl": "service.providers.bfl",
    "replicate": "service.providers.replicate",
    "local": "service.providers.local",
}
# Longest a provider's output URL may take to download (bounded by its timeout_s too).
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ProviderStatus:
    id: str
    kind: str
    live: bool
    # Why it is not live ("" when it is): a missing variable, or a kind not in this build.
    missing: str = ""


@dataclass
class Registry:
    """The live adapters by provider id, and every declared provider's status."""

    providers: dict[str, Provider] = field(default_factory=dict)
    status: dict[str, ProviderStatus] = field(default_factory=dict)
    _sessions: list[aiohttp.ClientSession] = field(default_factory=list)
    _downloaders: list[SafeDownloader] = field(default_factory=list)

    @property
    def live(self) -> frozenset[str]:
        return frozenset(self.providers)

    async def aclose(self) -> None:
        for provider_id, provider in self.providers.items():
            try:
                await provider.aclose()
            except Exception:
                log.exception("provider %s did not close cleanly", provider_id)
        for downloader in self._downloaders:
            await downloader.aclose()
        for session in self._sessions:
            await session.close()
        self.providers.clear()


async def build_registry(
    settings: Mapping[str, ProviderSettings],
    env: Mapping[str, str],
    *,
    kind_modules: Mapping[str, str] = KIND_MODULES,
    import_module: Callable[[str], ModuleType] = importlib.import_module,
) -> Registry:
    """Build every declared provider; never raises for one that cannot be built."""
    registry = Registry()
    for provider_id, provider_settings in settings.items():
        status = await _build(registry, provider_settings, env, kind_modules, import_module)
        registry.status[provider_id] = status
    return registry


async def _build(
    registry: Registry,
    settings: ProviderSettings,
    env: Mapping[str, str],
    kind_modules: Mapping[str, str],
    import_module: Callable[[str], ModuleType],
) -> ProviderStatus:
    module_name = kind_modules[settings.kind]
    try:
        create = import_module(module_name).create
    except (ImportError, AttributeError) as exc:
        # The adapter module (or a library it needs) is not installed: not fatal.
        why = f"kind {settings.kind!r} is not available ({exc})"
        log.warning("provider %s is not live: %s", settings.id, why)
        return ProviderStatus(settings.id, settings.kind, False, why)
    http = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=settings.timeout_s),
        trace_configs=propagation.trace_configs(),
    )
    download = SafeDownloader(
        settings.id, settings.download_hosts, timeout_s=min(settings.timeout_s, DOWNLOAD_TIMEOUT_S)
    )
    try:
        # In a thread: a factory may resolve credentials the slow way (Vertex's application
        # default credentials, the AWS chain), probing metadata servers over the network.
        deps = AdapterDeps(http=http, download=download, env=env)
        provider: Provider = await asyncio.to_thread(create, settings, deps)
    except Exception as exc:
        await download.aclose()
        await http.close()
        if isinstance(exc, MissingCredentials):
            log.info("provider %s (%s) is not live: %s", settings.id, settings.kind, exc)
            return ProviderStatus(settings.id, settings.kind, False, str(exc))
        # A setting the adapter cannot use (or its bug): say which, keep the others serving.
        # The text is scrubbed of every long environment value, in case one leaked into it.
        why = scrub(f"{type(exc).__name__}: {exc}", (v for v in env.values() if len(v) >= 12))
        log.error("provider %s (%s) could not be built: %s", settings.id, settings.kind, why)
        return ProviderStatus(settings.id, settings.kind, False, f"could not be built: {why}")
    registry.providers[settings.id] = provider
    registry._sessions.append(http)
    registry._downloaders.append(download)
    log.info("provider %s (%s) is live", settings.id, settings.kind)
    return ProviderStatus(settings.id, settings.kind, True)
