"""The model catalog: shipped defaults, the user's overrides, and refusing a bad file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.catalog import CatalogError, DispatchSettings, load_catalog
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
    assert "cheap" in catalog.ids() and "local" not in catalog.ids()
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


PROVIDERS = """
[dispatch]
max_attempts = 4
breaker_cooldown_s = 2.5

[providers.openai]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "MY_OPENAI_KEY"
timeout_s = 30
download_hosts = ["127.0.0.1"]

[providers.az]
kind = "azure_openai"
api_version = "2025-04-01-preview"

[models.both]
routes = [
  { provider = "openai", upstream_model = "gpt-image-1", max_n = 2 },
  { provider = "az", upstream_model = "dep", upstream_prices = { medium = { "1024x1024" = 3 } } },
]
family = "gpt-image"
sizes = ["1024x1024"]
default_size = "1024x1024"
qualities = ["medium"]
default_quality = "medium"
token_prices = { text_input = 5_000_000, image_input = 10_000_000, output = 40_000_000 }

[models.both.prices.medium]
"1024x1024" = 42000
"""


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return load_catalog(path)


def test_providers_routes_and_dispatch_settings(tmp_path: Path) -> None:
    catalog = _load(tmp_path, PROVIDERS)
    openai = catalog.providers["openai"]
    assert (openai.kind, openai.base_url, openai.api_key_env, openai.timeout_s) == (
        "openai",
        "http://127.0.0.1:9/v1",
        "MY_OPENAI_KEY",
        30.0,
    )
    assert openai.download_hosts == ("127.0.0.1",) and openai.options == {}
    assert catalog.providers["az"].options == {"api_version": "2025-04-01-preview"}
    # The implicit local provider is always there, beside the shipped ones.
    assert catalog.providers["local"].kind == "local"
    spec = catalog.models["both"]
    assert [(r.provider, r.upstream_model, r.max_n) for r in spec.routes] == [
        ("openai", "gpt-image-1", 2),
        ("az", "dep", None),
    ]
    assert (spec.provider, spec.upstream_model, spec.family) == (
        "openai",
        "gpt-image-1",
        "gpt-image",
    )
    assert spec.upstream_unit_price(spec.routes[1], "1024x1024", "medium") == 3
    assert spec.upstream_unit_price(spec.routes[0], "1024x1024", "medium") == 42000
    assert spec.token_prices is not None and spec.token_prices.output == 40_000_000
    assert catalog.dispatch.max_attempts == 4 and catalog.dispatch.breaker_cooldown_s == 2.5
    # Keys not in the file keep their documented defaults.
    assert catalog.dispatch.breaker_failures == DispatchSettings().breaker_failures


def test_shorthand_is_one_route(tmp_path: Path) -> None:
    spec = _load(tmp_path, USER_CATALOG).models["cheap"]
    assert [(r.provider, r.upstream_model) for r in spec.routes] == [("local", "local")]


def test_user_provider_replaces_the_default_of_that_id(tmp_path: Path) -> None:
    assert load_catalog().providers["openai"].base_url == ""
    catalog = _load(tmp_path, '[providers.openai]\nkind = "openai_compatible"\nbase_url = "x"')
    assert (catalog.providers["openai"].kind, catalog.providers["openai"].base_url) == (
        "openai_compatible",
        "x",
    )
    # The shipped models routed to it still load, now routed to the user's provider.
    assert catalog.models["dall-e-3"].routes[0].provider == "openai"


def test_disabled_provider_takes_its_routes_along(tmp_path: Path) -> None:
    catalog = _load(
        tmp_path, "[providers.azure]\nenabled = false\n[providers.openai]\nenabled = false"
    )
    assert "azure" not in catalog.providers
    assert "dall-e-3" not in catalog.models  # both its routes gone
    assert "imagen-3" in catalog.models


def test_served_keeps_live_routes_only() -> None:
    catalog = load_catalog()
    served = catalog.served({"local", "vertex"})
    assert "dall-e-3" not in served.models
    imagen = served.models["imagen-3"]
    assert [r.provider for r in imagen.routes] == ["vertex"] and imagen.provider == "vertex"
    assert set(catalog.served({"local"}).models) == {"local"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[providers.x]\nkind = "dalle"', "provider 'x': unknown kind 'dalle'"),
        ("[providers.x]\nbase_url = 'u'", "provider 'x': unknown kind None"),
        ('[providers.local]\nkind = "openai"', "kind must be 'local'"),
        ('[providers.x]\nkind = "openai"\ntimeout_s = -1', "timeout_s"),
        ('[providers.x]\nkind = "openai"\ndownload_hosts = "h"', "download_hosts"),
        (USER_CATALOG.replace('provider = "local"', 'provider = "nowhere"'), "'nowhere'"),
        (
            PROVIDERS.replace('provider = "az"', 'provider = "azure2"'),
            "route names provider 'azure2', which is not declared",
        ),
        (PROVIDERS.replace("max_n = 2", "max_n = 11"), "max_n"),
        (PROVIDERS.replace("max_n = 2", "maxn = 2"), "unknown route keys"),
        (PROVIDERS.replace("family", 'provider = "openai"\nfamily'), "either `routes`"),
        (PROVIDERS.replace("routes = [", "routes = []\nx = ["), "non-empty"),
        (PROVIDERS.replace("output = 40_000_000", "output = 0.5"), "integer micro-USD"),
        (PROVIDERS.replace("output = 40_000_000", "out = 1"), "token_prices"),
        (PROVIDERS.replace("max_attempts = 4", "max_attempts = 0"), "at least 1"),
        (PROVIDERS.replace("max_attempts = 4", "max_tries = 4"), "unknown keys"),
        (PROVIDERS.replace("max_attempts = 4", "max_attempts = 2.5"), "integer"),
        (PROVIDERS.replace("breaker_cooldown_s = 2.5", "breaker_cooldown_s = -1"), "non-neg"),
        (USER_CATALOG.replace("[models.cheap]", "[model.cheap]"), "unknown top-level key 'model'"),
    ],
)
def test_bad_providers_routes_and_dispatch_are_refused_naming_them(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(CatalogError, match=re.escape(message)):
        _load(tmp_path, text)


KINDS_SHIPPED = {
    "openai",
    "azure_openai",
    "google",
    "vertex",
    "bedrock",
    "stability",
    "bfl",
    "replicate",
    "local",
}


def test_shipped_catalog_has_real_models_for_every_kind() -> None:
    catalog = load_catalog()
    kinds = {
        catalog.providers[r.provider].kind for spec in catalog.models.values() for r in spec.routes
    }
    assert kinds == KINDS_SHIPPED
    for spec in catalog.models.values():
        assert spec.family, spec.id
        # The default request of every model is priced.
        assert spec.unit_price(spec.default_size, spec.default_quality), spec.id
        # Every size and quality it allows has a price.
        for size in spec.sizes:
            for quality in spec.qualities:
                assert spec.unit_price(size, quality), (spec.id, size, quality)
    # The ModelMax examples' id, on the Gemini API first.
    imagen = catalog.models["imagen-3"]
    assert imagen.routes[0].key == ("google", "imagen-3.0-generate-002")
    assert [r.provider for r in imagen.routes] == ["google", "vertex"]
    gpt = catalog.models["gpt-image-1"]
    assert gpt.token_prices is not None and gpt.reports_output
    assert (gpt.token_prices.text_input, gpt.token_prices.image_input) == (5_000_000, 10_000_000)
    assert gpt.token_prices.output == 40_000_000
    assert gpt.unit_price("1024x1024", "high") == 167_000
    assert catalog.models["dall-e-3"].unit_price("1792x1024", "hd") == 120_000
    assert (
        catalog.models["flux-schnell"].routes[0].upstream_model == "black-forest-labs/flux-schnell"
    )
    assert "*.bfl.ai" in catalog.providers["bfl"].download_hosts
    assert "replicate.delivery" in catalog.providers["replicate"].download_hosts
    assert "*.blob.core.windows.net" in catalog.providers["azure"].download_hosts
