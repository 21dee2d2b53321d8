"""The model catalog: which models exist, what they accept, and what they cost."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_CATALOG = "catalog_default.toml"


class CatalogError(ValueError):
    """The catalog file is malformed; raised at start-up, never per request."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    provider: str
    upstream_model: str
    sizes: tuple[str, ...]
    default_size: str
    qualities: tuple[str, ...]
    default_quality: str
    # micro-USD per image, keyed by (size, quality).
    prices: Mapping[tuple[str, str], int]
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

    def unit_price(self, size: str, quality: str) -> int | None:
        return self.prices.get((size, quality))


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, ModelSpec] = field(default_factory=dict)

    def get(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)

    def ids(self) -> list[str]:
        return sorted(self.models)


def load_catalog(user_file: Path | None = None) -> Catalog:
    """The shipped defaults, with the user's file laid over them model by model."""
    text = resources.files("service").joinpath(DEFAULT_CATALOG).read_text()
    raw: dict[str, Any] = dict(_parse(text, DEFAULT_CATALOG).get("models", {}))
    if user_file is not None:
        try:
            user_text = user_file.read_text()
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {user_file}: {exc.strerror}") from exc
        raw.update(_parse(user_text, str(user_file)).get("models", {}))
    models = {
        model_id: _model(model_id, entry)
        for model_id, entry in raw.items()
        if entry.get("enabled", True)
    }
    return Catalog(models)


def _parse(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{origin}: {exc}") from exc


def _model(model_id: str, entry: Mapping[str, Any]) -> ModelSpec:
    try:
        prices = {
            (size, quality): _micros(model_id, price)
            for quality, by_size in entry.get("prices", {}).items()
            for size, price in by_size.items()
        }
        spec = ModelSpec(
            id=model_id,
            provider=str(entry["provider"]),
            upstream_model=str(entry.get("upstream_model", model_id)),
            sizes=tuple(entry["sizes"]),
            default_size=str(entry["default_size"]),
            qualities=tuple(entry["qualities"]),
            default_quality=str(entry["default_quality"]),
            prices=prices,
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
        )
    except CatalogError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CatalogError(f"model {model_id!r}: bad or missing field {exc}") from exc
    if spec.default_size not in spec.sizes or spec.default_quality not in spec.qualities:
        raise CatalogError(f"model {model_id!r}: default size/quality not among its allowed ones")
    if not 1 <= spec.n_max <= 10:
        raise CatalogError(f"model {model_id!r}: n_max must be 1-10")
    return spec


def _micros(model_id: str, price: object) -> int:
    # Money is integers only: a float price in the file is a mistake to report.
    if not isinstance(price, int) or isinstance(price, bool) or price < 0:
        raise CatalogError(f"model {model_id!r}: prices are non-negative integer micro-USD")
    return price
