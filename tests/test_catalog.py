"""The model catalog: shipped defaults, the user's overrides, and refusing a bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.catalog import CatalogError, load_catalog
from service.errors import InvalidParameter, ModelNotSupported
from service.requests import GenerationParams, validate

SIZES = ["256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792"]


def test_default_catalog_prices_every_local_size_and_quality() -> None:
    local = load_catalog().models["local"]
    assert list(local.sizes) == SIZES
    for size in SIZES:
        for quality in local.qualities:
            price = local.unit_price(size, quality)
            assert isinstance(price, int) and price > 0


USER_CATALOG = """
[models.local]
enabled = false

[models.cheap]
provider = "local"
upstream_model = "local"
sizes = ["256x256", "512x512"]
default_size = "256x256"
qualities = ["standard"]
default_quality = "standard"
n_max = 2

[models.cheap.prices.standard]
"256x256" = 10
"""


def test_user_file_replaces_and_removes_models(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(USER_CATALOG)
    catalog = load_catalog(path)
    assert catalog.ids() == ["cheap"]
    request = validate(GenerationParams(prompt="p", n=2), catalog, "cheap")
    assert (request.size, request.quote) == ("256x256", 20)
    # Allowed but unpriced: refused before any charge, naming the field.
    with pytest.raises(InvalidParameter) as raised:
        validate(GenerationParams(prompt="p", size="512x512"), catalog, "cheap")
    assert raised.value.param == "size"
    with pytest.raises(ModelNotSupported):
        validate(GenerationParams(prompt="p", model="local"), catalog, "cheap")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.x]\nprovider = 1.5", "bad or missing field"),
        ("not toml [", "catalog.toml"),
        (USER_CATALOG.replace('"256x256" = 10', '"256x256" = 0.01'), "integer micro-USD"),
        (USER_CATALOG.replace("n_max = 2", "n_max = 11"), "n_max"),
        (USER_CATALOG.replace('default_size = "256x256"', 'default_size = "9x9"'), "default"),
    ],
)
def test_bad_catalog_is_refused_at_start(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=message):
        load_catalog(path)


def test_missing_catalog_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog(tmp_path / "nope.toml")
