"""End-to-end harness for provider tests: the real service and fronts, a test catalog.

A test declares its providers (pointing `base_url` at fake upstreams on
127.0.0.1), its models and routes, and the environment the credentials come
from; `provider_stack` writes the catalog to the test's directory and starts the
service, the aiohttp front and (when FRONTS includes it) Envoy:

    fake = FakeOpenAI(); await fake.start()
    async with provider_stack(
        tmp_path,
        providers={"openai": provider("openai", fake.base_url + "/v1")},
        models={"gpt-image-1": model(route("openai", "gpt-image-1"), family="gpt-image")},
        env={"OPENAI_API_KEY": "sk-test-upstream"},
    ) as stack:
        client = sdk(stack.fronts["aiohttp"], tenant.key)

Providers get `download_hosts = ["127.0.0.1"]` and a short timeout; the
`[dispatch]` table has tiny backoffs and cooldown so failover and breaker tests
run in milliseconds. The shipped catalog stays underneath (its providers are
not live without credentials), so only the test's own models are served.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from tests.conftest import FRONTS, Stack, start_stack

# Tiny waits: a breaker test sleeps past `breaker_cooldown_s`, never longer.
FAST_DISPATCH: dict[str, Any] = {
    "max_attempts": 2,
    "backoff_base_s": 0.001,
    "backoff_max_s": 0.005,
    "breaker_failures": 2,
    "breaker_cooldown_s": 0.3,
}
# Fake credentials for every kind's default variable: adapters find one, fakes check it.
FAKE_ENV: dict[str, str] = {
    "OPENAI_API_KEY": "sk-test-openai-0123456789",
    "AZURE_OPENAI_API_KEY": "test-azure-0123456789",
    "GEMINI_API_KEY": "test-gemini-0123456789",
    "VERTEX_ACCESS_TOKEN": "test-vertex-token-0123456789",
    "AWS_ACCESS_KEY_ID": "AKIATESTTESTTESTTEST",
    "AWS_SECRET_ACCESS_KEY": "test-aws-secret-0123456789",
    "AWS_REGION": "us-east-1",
    "STABILITY_API_KEY": "sk-test-stability-0123456789",
    "BFL_API_KEY": "test-bfl-0123456789",
    "REPLICATE_API_TOKEN": "r8_test0123456789",
    "SCRIPTED_API_KEY": "test-scripted-0123456789",
}
SIZES = ["256x256", "1024x1024", "1792x1024", "1024x1792", "1536x1024", "1024x1536"]
UNIT_PRICE = 1000


def provider(kind: str, base_url: str = "", **keys: Any) -> dict[str, Any]:
    """A `[providers.ID]` table for a fake upstream on 127.0.0.1."""
    table: dict[str, Any] = {"kind": kind, "timeout_s": 5, "download_hosts": ["127.0.0.1"]}
    if base_url:
        table["base_url"] = base_url
    return table | keys


def route(provider_id: str, upstream_model: str, **keys: Any) -> dict[str, Any]:
    return {"provider": provider_id, "upstream_model": upstream_model} | keys


def model(*routes: dict[str, Any], **keys: Any) -> dict[str, Any]:
    """A `[models.ID]` table: the routes, and broad capabilities at UNIT_PRICE per image
    (override any key, e.g. family=..., sizes=..., prices=..., token_prices=...)."""
    table: dict[str, Any] = {
        "routes": list(routes),
        "sizes": SIZES,
        "default_size": "1024x1024",
        "qualities": ["standard"],
        "default_quality": "standard",
        "n_max": 10,
        "prompt_max_chars": 32000,
        "output_formats": ["png", "jpeg", "webp"],
        "prices": {"standard": dict.fromkeys(SIZES, UNIT_PRICE)},
    }
    return table | keys


def catalog_toml(
    providers: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    dispatch: Mapping[str, Any] | None = None,
) -> str:
    """A catalog file's text (TOML) from plain dicts."""
    lines = ["[dispatch]", *_pairs(FAST_DISPATCH if dispatch is None else dispatch), ""]
    for section, tables in (("providers", providers), ("models", models)):
        for table_id, table in tables.items():
            lines += [f"[{section}.{json.dumps(table_id)}]", *_pairs(table), ""]
    return "\n".join(lines)


def _pairs(table: Mapping[str, Any]) -> list[str]:
    return [f"{json.dumps(k)} = {_value(v)}" for k, v in table.items()]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        # JSON strings and numbers are TOML too.
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


@contextlib.asynccontextmanager
async def provider_stack(
    tmp_path: Path,
    *,
    providers: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    env: Mapping[str, str] | None = None,
    dispatch: Mapping[str, Any] | None = None,
    kind_modules: Mapping[str, str] | None = None,
    envoy: bool | None = None,
    **config: object,
) -> AsyncIterator[Stack]:
    """The service and fronts over a test catalog; `env` defaults to FAKE_ENV.

    `kind_modules` maps a kind to a test adapter module (e.g. tests.fakes.scripted);
    `config` overrides Config fields (upstream_timeout_s=..., ...)."""
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog_toml(providers, models, dispatch))
    stack, closers = await start_stack(
        tmp_path / "data",
        envoy="envoy" in FRONTS if envoy is None else envoy,
        env=FAKE_ENV if env is None else env,
        kind_modules=kind_modules,
        catalog=catalog,
        **config,
    )
    try:
        yield stack
    finally:
        for close in closers:
            await close()
