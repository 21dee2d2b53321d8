"""`imagegate config check` and `config docs`, and the settings table the CLI builds
its flags from: the service's Config and the front's GatewayConfig, loaded once."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from gateway.config import GatewayConfig
from service.catalog import load_catalog
from service.catalog_settings import CatalogError
from service.config import Config
from service.providers.registry import build_registry
from settings.fields import FRONT, SERVICE, Setting
from settings.flags import add_flags, flag_values, markdown
from settings.loader import load, table

COMMANDS_SHOWN = {"imagegate": "every command", "admin": "admin commands"}


# The config dataclasses, each with the commands that read it.
CONFIGS = ((Config, SERVICE), (GatewayConfig, FRONT))


def settings_table() -> list[Setting]:
    """Every setting, the service's first; one row for those both processes read."""
    return table(*CONFIGS)


def load_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """The service's settings (and every command's log settings); SettingError if bad."""
    return load(Config, os.environ if env is None else env, flag_values(args))


def load_front(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> GatewayConfig:
    return load(GatewayConfig, os.environ if env is None else env, flag_values(args))


def add_config_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("config", help="Check the configuration, or print its table.")
    actions = group.add_subparsers(required=True, metavar="ACTION")
    text = (
        "Load the settings (environment, then these flags) and the catalog, and say which "
        "providers have credentials, without binding a port or opening the database: exit 0, "
        "or 2 with what is wrong."
    )
    check = actions.add_parser("check", help=text, description=text)
    add_flags(check, settings_table(), "serve")
    check.set_defaults(func=_check, front=True)
    text = "Print docs/configuration.md: every setting, its variable, flag, default and meaning."
    docs = actions.add_parser("docs", help=text, description=text)
    # The same text whatever the environment holds.
    docs.set_defaults(func=_docs, environment=False)


def docs_text() -> str:
    return markdown(settings_table(), COMMANDS_SHOWN)


async def _docs(args: argparse.Namespace) -> int:
    sys.stdout.write(docs_text())
    return 0


async def _check(args: argparse.Namespace) -> int:
    """Settings were loaded (and checked) before this runs; the rest is checked here."""
    config, front = args.config, args.front_config
    problems: list[str] = []
    print("settings: valid")
    for name, value in _changed(config, front):
        print(f"  {name} = {value}")
    problems += _libraries(config)
    try:
        catalog = load_catalog(config.catalog)
    except CatalogError as exc:
        problems.append(f"catalog: {exc}")
    else:
        # The lines below say what is missing; the registry's log lines would repeat it.
        logging.getLogger("imagegate.providers").setLevel(logging.ERROR)
        registry = await build_registry(catalog.providers, os.environ)
        served = catalog.served(registry.live)
        await registry.aclose()
        print(
            f"catalog: {config.catalog or 'the shipped catalog'}: {len(catalog.models)} models, "
            f"{len(served.models)} served"
        )
        for status in registry.status.values():
            state = "live" if status.live else f"not live: {status.missing}"
            print(f"  provider {status.id} ({status.kind}): {state}")
        if not served.models:
            problems.append("catalog: no model is served (no live provider on any route)")
        if config.default_model not in catalog.models:
            problems.append(f"default_model: {config.default_model!r} is not in the catalog")
        elif config.default_model not in served.models:
            problems.append(f"default_model: {config.default_model!r} has no live route")
    for problem in problems:
        print(f"imagegate: {problem}", file=sys.stderr)
    if problems:
        return 2
    print("configuration: ok")
    return 0


def _changed(config: Config, front: GatewayConfig) -> list[tuple[str, str]]:
    """The settings not at their default, secrets shown as (set)."""
    changed: dict[str, str] = {}
    for row in settings_table():
        owner = config if "Config" in row.owners else front
        value = getattr(owner, row.name)
        if value != row.default:
            shown = str(value) if isinstance(value, Path) else repr(value)
            changed[row.name] = "(set)" if row.secret else shown
    return list(changed.items())


def _libraries(config: Config) -> list[str]:
    """Settings that need an optional extra that is not installed."""
    needs = {
        "database_url": (config.uses_postgres, "asyncpg", "postgres"),
        "redis_url": (bool(config.redis_url), "redis", "redis"),
        "image_store": (config.image_store.startswith("s3://"), "botocore", "s3"),
    }
    return [
        f"{name}: needs {module} (pip install 'imagegate[{extra}]')"
        for name, (used, module, extra) in needs.items()
        if used and importlib.util.find_spec(module) is None
    ]
