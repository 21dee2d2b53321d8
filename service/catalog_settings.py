"""The catalog's `[providers.ID]` and `[dispatch]` tables: the upstreams, and how hard to try."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# Every provider kind the registry knows how to build (the adapter module per kind
# lives in service/providers/registry.py).
KINDS = (
    "openai",
    "openai_compatible",
    "azure_openai",
    "google",
    "vertex",
    "bedrock",
    "stability",
    "bfl",
    "replicate",
    "local",
)
# The built-in offline provider: declared implicitly, so `local` routes always work.
LOCAL = "local"
_COMMON_KEYS = ("kind", "base_url", "api_key_env", "timeout_s", "download_hosts", "enabled")


class CatalogError(ValueError):
    """The catalog file is malformed; raised at start-up, never per request."""


@dataclass(frozen=True)
class ProviderSettings:
    """One `[providers.ID]` table of the catalog, read once at start-up."""

    id: str
    kind: str
    # What the vendor's own SDK calls its base URL / endpoint; "" = the vendor's default.
    base_url: str = ""
    # Environment variable holding the credential; "" = the kind's default name.
    api_key_env: str = ""
    timeout_s: float = 300.0
    # Hosts (exact, or "*.suffix") that this provider's output URLs may be fetched from.
    download_hosts: tuple[str, ...] = ()
    # Kind-specific keys: api_version (azure_openai); project, location (vertex); region (bedrock).
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DispatchSettings:
    """`[dispatch]`: retries per route, their backoff, and the per-route circuit breaker."""

    # Attempts on one route (the first call included) before failing over to the next.
    max_attempts: int = 3
    # Full-jitter exponential backoff: sleep random(0, min(max, base * 2**retry)).
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    # Consecutive failed attempts on a route that open its breaker...
    breaker_failures: int = 5
    # ...for this long; then one probe call decides whether it closes again.
    breaker_cooldown_s: float = 30.0


def parse_providers(
    raw: Mapping[str, Any],
) -> tuple[dict[str, ProviderSettings], frozenset[str]]:
    """The declared providers, and the ids declared with `enabled = false`."""
    providers: dict[str, ProviderSettings] = {LOCAL: ProviderSettings(LOCAL, LOCAL)}
    disabled: set[str] = set()
    for provider_id, entry in raw.items():
        if not isinstance(entry, Mapping):
            raise CatalogError(f"provider {provider_id!r}: expected a table")
        if not entry.get("enabled", True):
            disabled.add(provider_id)
            providers.pop(provider_id, None)
            continue
        providers[provider_id] = _provider(provider_id, entry)
    return providers, frozenset(disabled)


def _provider(provider_id: str, entry: Mapping[str, Any]) -> ProviderSettings:
    kind = entry.get("kind")
    if kind not in KINDS:
        raise CatalogError(
            f"provider {provider_id!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}"
        )
    if provider_id == LOCAL and kind != LOCAL:
        raise CatalogError("provider 'local' is the built-in renderer; its kind must be 'local'")
    try:
        hosts = entry.get("download_hosts", [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise TypeError("download_hosts must be a list of host names")
        timeout = float(entry.get("timeout_s", 300.0))
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout_s must be a positive number of seconds")
        options = {k: _option(k, v) for k, v in entry.items() if k not in _COMMON_KEYS}
        return ProviderSettings(
            id=provider_id,
            kind=kind,
            base_url=_text(entry, "base_url"),
            api_key_env=_text(entry, "api_key_env"),
            timeout_s=timeout,
            download_hosts=tuple(hosts),
            options=options,
        )
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"provider {provider_id!r}: {exc}") from exc


def _text(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _option(key: str, value: object) -> str:
    # Kind-specific keys are scalars; the adapter parses what it needs from text.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise TypeError(f"{key} must be a string or a number")


def parse_dispatch(raw: Mapping[str, Any]) -> DispatchSettings:
    known = {f.name for f in fields(DispatchSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CatalogError(f"[dispatch]: unknown keys {unknown}; expected {sorted(known)}")
    defaults = DispatchSettings()
    values: dict[str, Any] = {}
    for name, value in raw.items():
        default = getattr(defaults, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CatalogError(f"[dispatch] {name}: expected a number")
        if isinstance(default, int) and not isinstance(value, int):
            raise CatalogError(f"[dispatch] {name}: expected an integer")
        if not (math.isfinite(value) and value >= 0):
            raise CatalogError(f"[dispatch] {name}: expected a non-negative number")
        values[name] = type(default)(value)
    settings = DispatchSettings(**values)
    if settings.max_attempts < 1 or settings.breaker_failures < 1:
        raise CatalogError("[dispatch] max_attempts and breaker_failures must be at least 1")
    return settings
