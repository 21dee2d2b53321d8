"""The model catalog: which models exist, what they accept, what they cost, and who makes them."""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from service.catalog_settings import (
    LOCAL,
    CatalogError,
    DispatchSettings,
    ProviderSettings,
    parse_dispatch,
    parse_providers,
)

__all__ = [
    "DEFAULT_CATALOG",
    "Catalog",
    "CatalogError",
    "DispatchSettings",
    "InputRules",
    "ModelSpec",
    "ProviderSettings",
    "Route",
    "TokenPrices",
    "load_catalog",
]

DEFAULT_CATALOG = "catalog_default.toml"
# micro-USD prices by (size, quality).
Prices = Mapping[tuple[str, str], int]
# Token prices are per million tokens.
TOKENS_PER_PRICE_UNIT = 1_000_000
# Tokens an upstream may add around the prompt's own, per call (its instructions).
PROMPT_TOKEN_OVERHEAD = 64


@dataclass(frozen=True)
class Route:
    """One way to make a model's images: a provider id and that provider's model name."""

    provider: str
    upstream_model: str
    # Most images per upstream call on this route; None = whatever the adapter allows.
    max_n: int | None = None
    # What the upstream lists the images at (for margins); None = the model's prices.
    upstream_prices: Prices | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.provider, self.upstream_model)

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.upstream_model}"


@dataclass(frozen=True)
class TokenPrices:
    """micro-USD per 1M tokens, for models the upstream bills by token (gpt-image)."""

    text_input: int = 0
    image_input: int = 0
    output: int = 0

    def prompt_bound_micros(self, prompt: str, calls: int) -> int:
        """The most a prompt's input text can cost over `calls` upstream calls, rounded up:
        a token is at least one UTF-8 byte, plus what an upstream wraps around it."""
        tokens = (len(prompt.encode()) + PROMPT_TOKEN_OVERHEAD) * calls
        return -(-tokens * self.text_input // TOKENS_PER_PRICE_UNIT)


MiB = 1024 * 1024
# OpenAI's input formats for edits and variations.
INPUT_FORMATS = ("png", "jpeg", "webp")


@dataclass(frozen=True)
class InputRules:
    """What a model takes as input images (edits, variations): the catalog's `inputs` table.
    The defaults are OpenAI's gpt-image rules; dall-e-2 takes one square PNG under 4 MiB."""

    max_images: int = 16
    # Per file; a larger one is a 413.
    max_bytes: int = 50 * MiB
    formats: tuple[str, ...] = INPUT_FORMATS
    square: bool = False
    # Token-priced models: the most input tokens one image can count for in one
    # upstream call (the reservation's bound; gpt-image counts ~3,000 for a
    # 1024x1024 image at input_fidelity high).
    image_tokens_max: int = 6500


@dataclass(frozen=True)
class ModelSpec:
    id: str
    # The preferred route (routes[0]); kept for the one-route shorthand of the file.
    provider: str
    upstream_model: str
    sizes: tuple[str, ...]
    default_size: str
    qualities: tuple[str, ...]
    default_quality: str
    # micro-USD per image, keyed by (size, quality).
    prices: Prices
    n_max: int = 1
    prompt_max_chars: int = 4000
    owned_by: str = "imagegate"
    created: int = 0
    description: str = ""
    # Empty tuple: the parameter is not accepted for this model.
    output_formats: tuple[str, ...] = ()
    backgrounds: tuple[str, ...] = ()
    styles: tuple[str, ...] = ()
    moderations: tuple[str, ...] = ()
    reports_output: bool = False
    # In order of preference; empty = the single route (provider, upstream_model).
    routes: tuple[Route, ...] = ()
    # The request shape adapters build: gpt-image, dall-e-3, imagen, flux, ... (docs/providers.md).
    family: str = ""
    # Set for token-priced models: charged from the usage the upstream reports.
    token_prices: TokenPrices | None = None
    # POST /v1/images/edits and /v1/images/variations: whether the model takes them.
    edits: bool = False
    variations: bool = False
    # Empty tuple: `input_fidelity` is not accepted.
    input_fidelities: tuple[str, ...] = ()
    inputs: InputRules = field(default_factory=InputRules)

    def __post_init__(self) -> None:
        if not self.routes:
            object.__setattr__(self, "routes", (Route(self.provider, self.upstream_model),))

    def unit_price(self, size: str, quality: str) -> int | None:
        return self.prices.get((size, quality))

    def upstream_unit_price(self, route: Route, size: str, quality: str) -> int:
        """What the route's upstream lists one image at; the model's price where the
        route names none."""
        own = self.prices.get((size, quality), 0)
        return (
            own
            if route.upstream_prices is None
            else route.upstream_prices.get((size, quality), own)
        )


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, ModelSpec] = field(default_factory=dict)
    providers: Mapping[str, ProviderSettings] = field(
        default_factory=lambda: {LOCAL: ProviderSettings(LOCAL, LOCAL)}
    )
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)

    def get(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)

    def ids(self) -> list[str]:
        return sorted(self.models)

    def served(self, live: Collection[str]) -> Catalog:
        """Only routes to live providers, and only models left with at least one route."""
        models = {}
        for model_id, spec in self.models.items():
            routes = tuple(r for r in spec.routes if r.provider in live)
            if routes:
                models[model_id] = _with_routes(spec, routes)
        return replace(self, models=models)


def load_catalog(user_file: Path | None = None) -> Catalog:
    """The shipped defaults, with the user's file laid over them model by model and
    provider by provider (an id in the user's file replaces the default entry whole)."""
    text = resources.files("service").joinpath(DEFAULT_CATALOG).read_text()
    tables = _parse(text, DEFAULT_CATALOG)
    raw = {name: dict(tables.get(name, {})) for name in ("models", "providers", "dispatch")}
    if user_file is not None:
        try:
            user_text = user_file.read_text()
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {user_file}: {exc.strerror}") from exc
        for name, table in _parse(user_text, str(user_file)).items():
            if name not in raw or not isinstance(table, Mapping):
                raise CatalogError(
                    f"{user_file}: unknown top-level key {name!r}; "
                    "expected [models.ID], [providers.ID] or [dispatch]"
                )
            raw[name].update(table)
    providers, disabled = parse_providers(raw["providers"])
    models = {}
    for model_id, entry in raw["models"].items():
        if not isinstance(entry, Mapping):
            raise CatalogError(f"model {model_id!r}: expected a table")
        if not entry.get("enabled", True):
            continue
        spec = _model(model_id, entry)
        for route in spec.routes:
            if route.provider not in providers and route.provider not in disabled:
                raise CatalogError(
                    f"model {model_id!r}: route names provider {route.provider!r}, "
                    "which is not declared in [providers]"
                )
        # Routes to a provider switched off with `enabled = false` are dropped.
        routes = tuple(r for r in spec.routes if r.provider in providers)
        if routes:
            models[model_id] = _with_routes(spec, routes)
    return Catalog(models, providers, parse_dispatch(raw["dispatch"]))


def _with_routes(spec: ModelSpec, routes: tuple[Route, ...]) -> ModelSpec:
    first = routes[0]
    return replace(
        spec, routes=routes, provider=first.provider, upstream_model=first.upstream_model
    )


def _parse(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{origin}: {exc}") from exc


def _model(model_id: str, entry: Mapping[str, Any]) -> ModelSpec:
    try:
        routes = _routes(model_id, entry)
        spec = ModelSpec(
            id=model_id,
            provider=routes[0].provider,
            upstream_model=routes[0].upstream_model,
            sizes=tuple(entry["sizes"]),
            default_size=str(entry["default_size"]),
            qualities=tuple(entry["qualities"]),
            default_quality=str(entry["default_quality"]),
            prices=_prices(model_id, entry.get("prices", {})),
            n_max=int(entry.get("n_max", 1)),
            prompt_max_chars=int(entry.get("prompt_max_chars", 4000)),
            owned_by=str(entry.get("owned_by", "imagegate")),
            created=int(entry.get("created", 0)),
            description=str(entry.get("description", "")),
            output_formats=tuple(entry.get("output_formats", ())),
            backgrounds=tuple(entry.get("backgrounds", ())),
            styles=tuple(entry.get("styles", ())),
            moderations=tuple(entry.get("moderations", ())),
            reports_output=bool(entry.get("reports_output", False)),
            routes=routes,
            family=str(entry.get("family", "")),
            token_prices=_token_prices(model_id, entry.get("token_prices")),
            edits=_flag(model_id, entry, "edits"),
            variations=_flag(model_id, entry, "variations"),
            input_fidelities=tuple(entry.get("input_fidelities", ())),
            inputs=_inputs(model_id, entry.get("inputs")),
        )
    except CatalogError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CatalogError(f"model {model_id!r}: bad or missing field {exc}") from exc
    if spec.default_size not in spec.sizes or spec.default_quality not in spec.qualities:
        raise CatalogError(f"model {model_id!r}: default size/quality not among its allowed ones")
    if not 1 <= spec.n_max <= 10:
        raise CatalogError(f"model {model_id!r}: n_max must be 1-10")
    return spec


def _routes(model_id: str, entry: Mapping[str, Any]) -> tuple[Route, ...]:
    if "routes" not in entry:
        # The one-route shorthand: provider = ..., upstream_model = ...
        provider = entry["provider"]
        if not isinstance(provider, str):
            raise TypeError("provider must be a string")
        return (Route(provider, str(entry.get("upstream_model", model_id))),)
    if "provider" in entry:
        raise CatalogError(f"model {model_id!r}: give either `routes` or `provider`, not both")
    raw = entry["routes"]
    if not isinstance(raw, list) or not raw:
        raise CatalogError(f"model {model_id!r}: routes must be a non-empty list of tables")
    return tuple(_route(model_id, r) for r in raw)


def _route(model_id: str, raw: object) -> Route:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("provider"), str):
        raise CatalogError(f"model {model_id!r}: each route needs a provider (a string)")
    unknown = set(raw) - {"provider", "upstream_model", "max_n", "upstream_prices"}
    if unknown:
        raise CatalogError(f"model {model_id!r}: unknown route keys {sorted(unknown)}")
    max_n = raw.get("max_n")
    if max_n is not None and (
        isinstance(max_n, bool) or not isinstance(max_n, int) or not 1 <= max_n <= 10
    ):
        raise CatalogError(f"model {model_id!r}: a route's max_n must be an integer 1-10")
    upstream = raw.get("upstream_prices")
    return Route(
        provider=raw["provider"],
        upstream_model=str(raw.get("upstream_model", model_id)),
        max_n=max_n,
        upstream_prices=None if upstream is None else _prices(model_id, upstream),
    )


def _prices(model_id: str, table: Mapping[str, Mapping[str, object]]) -> dict[tuple[str, str], int]:
    return {
        (size, quality): _micros(model_id, price)
        for quality, by_size in table.items()
        for size, price in by_size.items()
    }


def _token_prices(model_id: str, table: object) -> TokenPrices | None:
    if table is None:
        return None
    if not isinstance(table, Mapping) or set(table) - {"text_input", "image_input", "output"}:
        raise CatalogError(
            f"model {model_id!r}: token_prices takes text_input, image_input and output"
        )
    return TokenPrices(**{k: _micros(model_id, v) for k, v in table.items()})


def _flag(model_id: str, entry: Mapping[str, Any], key: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise CatalogError(f"model {model_id!r}: {key} must be true or false")
    return value


def _inputs(model_id: str, table: object) -> InputRules:
    if table is None:
        return InputRules()
    known = {"max_images", "max_bytes", "formats", "square", "image_tokens_max"}
    if not isinstance(table, Mapping) or set(table) - known:
        raise CatalogError(f"model {model_id!r}: inputs takes {', '.join(sorted(known))}")
    rules = InputRules(
        max_images=table.get("max_images", InputRules.max_images),
        max_bytes=table.get("max_bytes", InputRules.max_bytes),
        formats=tuple(table.get("formats", INPUT_FORMATS)),
        square=table.get("square", False),
        image_tokens_max=table.get("image_tokens_max", InputRules.image_tokens_max),
    )
    counts = (rules.max_images, rules.max_bytes, rules.image_tokens_max)
    if (
        any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts)
        or not 1 <= rules.max_images <= 16
        or not set(rules.formats) <= set(INPUT_FORMATS)
        or not isinstance(rules.square, bool)
    ):
        raise CatalogError(
            f"model {model_id!r}: inputs: max_images 1-16, max_bytes and image_tokens_max "
            f"non-negative integers, formats among {', '.join(INPUT_FORMATS)}, square true/false"
        )
    return rules


def _micros(model_id: str, price: object) -> int:
    # Money is integers only: a float price in the file is a mistake to report.
    if not isinstance(price, int) or isinstance(price, bool) or price < 0:
        raise CatalogError(f"model {model_id!r}: prices are non-negative integer micro-USD")
    return price
