"""The one settings table: its loader (defaults < environment < flags, typed and checked,
errors naming the setting), the flags made from it, `imagegate config check`, and
docs/configuration.md generated from it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from service.cli import _parser
from service.config import Config
from service.config_commands import CONFIGS, docs_text, load_config, load_front, settings_table
from settings.fields import between, rows, setting
from settings.flags import add_flags, flag_values
from settings.loader import SettingError, disagreements, load, table
from tests.test_cli import CREDENTIAL_VARS, MODELS_CATALOG, _free_port

ROOT = Path(__file__).resolve().parents[1]


def _error(cls: type, env: dict[str, str], flags: dict[str, object] | None = None) -> str:
    with pytest.raises(SettingError) as caught:
        load(cls, env, flags)
    return str(caught.value)


def test_defaults_then_environment_then_flags() -> None:
    assert load(Config, {}) == Config()
    assert load(GatewayConfig, {}) == GatewayConfig()
    env = {"IMAGEGATE_GRPC_PORT": "50052", "IMAGEGATE_UPSTREAM_TIMEOUT_S": "12.5"}
    config = load(Config, env)
    assert (config.grpc_port, config.upstream_timeout_s) == (50052, 12.5)
    assert config.host == "127.0.0.1"  # untouched: the default
    flagged = load(Config, env, {"grpc_port": "50053", "data_dir": "/srv/x"})
    assert (flagged.grpc_port, flagged.upstream_timeout_s) == (50053, 12.5)
    assert flagged.data_dir == Path("/srv/x")
    # An empty variable counts as unset; a flag not given is None.
    assert load(Config, {"IMAGEGATE_GRPC_PORT": ""}, {"grpc_port": None}).grpc_port == 50051
    assert load(Config, {"IMAGEGATE_CATALOG": "README.md"}).catalog == Path("README.md")


def test_the_cli_loads_both_processes_from_one_set_of_flags() -> None:
    args = _parser().parse_args(
        ["serve", "--host", "127.0.0.2", "--rest-port", "8081", "--upstream-timeout", "9"]
    )
    env = {"IMAGEGATE_MAX_MESSAGE_BYTES": str(80 * 2**20), "IMAGEGATE_HOST": "0.0.0.0"}
    config, front = load_config(args, env), load_front(args, env)
    assert config.host == front.host == "127.0.0.2"
    assert config.max_message_bytes == front.max_message_bytes == 80 * 2**20
    assert (front.rest_port, config.upstream_timeout_s) == (8081, 9.0)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"IMAGEGATE_GRPC_PORT": "fifty"}, "grpc_port (IMAGEGATE_GRPC_PORT='fifty'): not a whole"),
        ({"IMAGEGATE_GRPC_PORT": "70000"}, "grpc_port (IMAGEGATE_GRPC_PORT='70000'): 70000 is not"),
        ({"IMAGEGATE_UPSTREAM_TIMEOUT_S": "soon"}, "upstream_timeout_s (IMAGEGATE_UPSTREAM_"),
        ({"IMAGEGATE_UPSTREAM_TIMEOUT_S": "0"}, "upstream_timeout_s (IMAGEGATE_UPSTREAM_TIMEOUT"),
        ({"IMAGEGATE_SWEEP_INTERVAL_S": "nan"}, "sweep_interval_s (IMAGEGATE_SWEEP_INTERVAL_S="),
        ({"IMAGEGATE_LIMIT_RPM": "-1"}, "limit_rpm (IMAGEGATE_LIMIT_RPM='-1'): -1 is not at least"),
        ({"IMAGEGATE_LOG_FORMAT": "xml"}, "log_format (IMAGEGATE_LOG_FORMAT='xml'): 'xml' is not"),
        ({"IMAGEGATE_METRICS_ADDRESS": "9464"}, "metrics_address (IMAGEGATE_METRICS_ADDRESS="),
        ({"IMAGEGATE_PUBLIC_URL": "ftp://x"}, "public_url (IMAGEGATE_PUBLIC_URL='ftp://x')"),
        ({"IMAGEGATE_PUBLIC_URL": "https://"}, "public_url (IMAGEGATE_PUBLIC_URL='https://')"),
        ({"IMAGEGATE_TRUSTED_PROXIES": "10.0.0.0/8,lan"}, "trusted_proxies (IMAGEGATE_TRUST"),
        ({"IMAGEGATE_IMAGE_STORE": "gs://b"}, "image_store (IMAGEGATE_IMAGE_STORE='gs://b')"),
        ({"IMAGEGATE_IMAGE_URL_HOSTS": "https://a.example"}, "image_url_hosts (IMAGEGATE_IMA"),
        ({"IMAGEGATE_CATALOG": "/no/such/catalog.toml"}, "catalog (IMAGEGATE_CATALOG='/no/such"),
        ({"IMAGEGATE_DATABASE_POOL_SIZE": "0"}, "database_pool_size (IMAGEGATE_DATABASE_POOL"),
    ],
)
def test_a_bad_value_names_its_setting_and_variable(env: dict[str, str], named: str) -> None:
    assert f"invalid setting {named}" in _error(Config, env)


def test_front_values_and_relations_are_checked() -> None:
    assert "grpc_target (IMAGEGATE_GRPC_TARGET='svc')" in _error(
        GatewayConfig, {"IMAGEGATE_GRPC_TARGET": "svc"}
    )
    assert load(GatewayConfig, {"IMAGEGATE_GRPC_TARGET": "dns:///svc:50051"}).grpc_target
    assert "rest_port (--rest-port '-1')" in _error(GatewayConfig, {}, {"rest_port": "-1"})
    # Valid alone, not together: an upload travels to the service in one gRPC message.
    too_big = _error(GatewayConfig, {"IMAGEGATE_MAX_MESSAGE_BYTES": str(2**20)})
    assert "max_upload_bytes (its default): 62914560 is not below max_message_bytes" in too_big
    alone = _error(GatewayConfig, {"IMAGEGATE_GRPC_PREFER_FIRST": "true"})
    assert "grpc_prefer_first (IMAGEGATE_GRPC_PREFER_FIRST='true'): needs grpc_round_robin" in alone
    both = {"IMAGEGATE_GRPC_PREFER_FIRST": "true", "IMAGEGATE_GRPC_ROUND_ROBIN": "true"}
    assert load(GatewayConfig, both).grpc_prefer_first
    shared = _error(Config, {"IMAGEGATE_IMAGE_STORE": "s3://bucket/images"})
    assert "invalid setting url_secret (its default): required with an s3:// image_store" in shared


def test_a_secret_is_never_repeated() -> None:
    text = _error(Config, {"IMAGEGATE_DATABASE_URL": "mysql://me:s3cret-pw@db/x"})
    assert text.startswith("invalid setting database_url (IMAGEGATE_DATABASE_URL): a mysql URL")
    assert "s3cret" not in text
    redis = _error(Config, {}, {"redis_url": "http://me:s3cret-pw@r/0"})
    assert "redis_url (--redis-url (secret))" in redis and "s3cret" not in redis
    assert "s3cret" not in repr(load(Config, {"IMAGEGATE_URL_SECRET": "s3cret-" * 5}))


def test_a_setting_is_one_declaration() -> None:
    @dataclass(frozen=True)
    class Extra:
        workers: int = setting(1, "worker processes", check=between(1))
        uvloop: bool = setting(False, "run on uvloop")

    assert load(Extra, {"IMAGEGATE_WORKERS": "4", "IMAGEGATE_UVLOOP": "yes"}) == Extra(4, True)
    assert load(Extra, {}, {"uvloop": "off"}).uvloop is False
    assert "uvloop (IMAGEGATE_UVLOOP='maybe'): not a boolean" in _error(
        Extra, {"IMAGEGATE_UVLOOP": "maybe"}
    )
    assert "workers (--workers '0')" in _error(Extra, {}, {"workers": "0"})
    parser = argparse.ArgumentParser()
    add_flags(parser, rows(Extra, ["serve"]), "serve")
    given = flag_values(parser.parse_args(["--no-uvloop", "--workers", "2"]))
    assert load(Extra, {"IMAGEGATE_UVLOOP": "true"}, given) == Extra(2, False)
    # Every real setting says what it means; a name both processes read is one row,
    # declared alike in both.
    assert not disagreements(*CONFIGS)
    shared = {r.name for r in settings_table() if len(r.owners) == 2}
    assert {"host", "max_message_bytes", "drain_grace_s"} <= shared

    @dataclass(frozen=True)
    class Plain:
        host: str = "127.0.0.1"
        drain_grace_s: float = 30.0

    problems = disagreements(*CONFIGS, (Plain, ()))
    assert "Plain.host: not a setting() with a meaning" in problems
    assert any(p.startswith("drain_grace_s: declared differently") for p in problems)
    # ...which the table tolerates (the CLI is built from it), taking the declared one.
    merged = {r.name: r for r in table(*CONFIGS, (Plain, ()))}
    assert merged["host"].meaning == "address the servers bind"


def test_every_existing_flag_still_works(tmp_path: Path) -> None:
    catalog = tmp_path / "c.toml"
    catalog.write_text(MODELS_CATALOG)
    # The flags README shows, as it shows them.
    argv = ["--log-format", "text", "--log-level", "debug", "serve", "--rest-port", "8081"]
    argv += ["--grpc-port", "50052", "--host", "127.0.0.2", "--data-dir", str(tmp_path)]
    argv += ["--database-url", "sqlite:///x.db", "--catalog", str(catalog), "--demo"]
    argv += ["--public-url", "https://img.example", "--metrics-address", "127.0.0.1:9466"]
    argv += ["--drain-grace", "3"]
    args = _parser().parse_args(argv)
    config, front = load_config(args, {}), load_front(args, {})
    assert (config.log_format, config.log_level, args.demo) == ("text", "debug", True)
    assert (config.grpc_port, front.rest_port, front.host) == (50052, 8081, "127.0.0.2")
    assert (config.data_dir, config.database_url) == (tmp_path, "sqlite:///x.db")
    assert (config.catalog, config.public_url) == (catalog, "https://img.example")
    assert (config.metrics_address, config.drain_grace_s, front.drain_grace_s) == (
        "127.0.0.1:9466",
        3.0,
        3.0,
    )
    argv = ["serve-rest", "--grpc-target", "127.0.0.1:1", "--metrics-address", "off"]
    rest = _parser().parse_args([*argv, "--drain-grace", "4", "--host", "127.0.0.3"])
    front = load_front(rest, {})
    assert (front.grpc_target, front.rest_metrics_address, front.drain_grace_s) == (
        "127.0.0.1:1",
        "off",
        4.0,
    )
    grpc_only = load_config(_parser().parse_args(["serve-grpc", "--grpc-port", "0"]), {})
    assert grpc_only.grpc_port == 0
    admin = _parser().parse_args(["keys", "list", "acme", "--data-dir", str(tmp_path)])
    assert load_config(admin, {}).data_dir == tmp_path
    models = _parser().parse_args(["models", "--catalog", str(catalog)])
    assert load_config(models, {}).catalog == catalog


def test_every_command_explains_its_flags() -> None:
    def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    helps = {p.prog: p.format_help() for p in parsers(_parser())}
    assert "[IMAGEGATE_UPSTREAM_TIMEOUT_S, 300]" in helps["imagegate serve"]
    assert "--metrics-address HOST:PORT" in helps["imagegate serve-rest"]
    assert "IMAGEGATE_REST_METRICS_ADDRESS" in helps["imagegate serve-rest"]
    assert "--url-secret" not in "".join(helps.values())  # a command line shows in `ps`
    assert "--grpc-target" not in helps["imagegate serve"]  # serve dials its own service


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["serve", "--grpc-port", "70000"], {}, "grpc_port (--grpc-port '70000')"),
        (["serve-grpc"], {"IMAGEGATE_UPSTREAM_TIMEOUT_S": "-5"}, "upstream_timeout_s (IMAGEGATE_"),
        (["serve-rest", "--max-upload-bytes", str(2**40)], {}, "max_upload_bytes (--max-upload"),
        (["--log-format", "xml", "serve"], {}, "log_format (--log-format 'xml')"),
    ],
)
def test_serve_refuses_a_bad_setting_before_it_starts(
    tmp_path: Path, argv: list[str], env: dict[str, str], named: str
) -> None:
    data_dir = tmp_path / "data"
    ports = ["--rest-port", str(_free_port())] if argv[-1] != "serve-grpc" else []
    result = _run(*argv, *ports, env={**env, "IMAGEGATE_DATA_DIR": str(data_dir)})
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"imagegate: invalid setting {named}"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == "" and not data_dir.exists()  # nothing opened, nothing bound


def test_config_check_accepts_a_good_configuration(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(MODELS_CATALOG)
    data_dir = tmp_path / "data"
    env = {"IMAGEGATE_DATA_DIR": str(data_dir), "IMAGEGATE_DEFAULT_MODEL": "mine"}
    env["IMAGEGATE_URL_SECRET"] = "s3cret-" * 6
    result = _run("config", "check", "--catalog", str(catalog), "--grpc-port", "50060", env=env)
    assert result.returncode == 0, result
    assert f"catalog = {catalog}" in result.stdout and "grpc_port = 50060" in result.stdout
    assert "url_secret = (set)" in result.stdout and "s3cret" not in result.stdout
    assert "provider mine (local): live" in result.stdout
    assert "provider openai (openai): not live: OPENAI_API_KEY is not set" in result.stdout
    assert result.stdout.rstrip().endswith("configuration: ok")
    assert not data_dir.exists()  # no database, no image folder, no signing key


def test_config_check_says_what_is_wrong(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(MODELS_CATALOG.replace('provider = "mine"', 'provider = "nope"'))
    bad = _run("config", "check", "--catalog", str(catalog))
    assert bad.returncode == 2, bad
    assert "imagegate: catalog: " in bad.stderr
    assert "provider 'nope', which is not declared" in bad.stderr
    assert "Traceback" not in bad.stderr and "configuration: ok" not in bad.stdout

    catalog.write_text(MODELS_CATALOG)
    unknown = _run("config", "check", "--catalog", str(catalog), "--default-model", "nope")
    assert unknown.returncode == 2
    assert "imagegate: default_model: 'nope' is not in the catalog" in unknown.stderr
    unserved = _run("config", "check", "--default-model", "dall-e-3")
    assert unserved.returncode == 2
    assert "default_model: 'dall-e-3' has no live route" in unserved.stderr
    setting_error = _run("config", "check", env={"IMAGEGATE_REST_PORT": "http"})
    assert setting_error.returncode == 2
    assert "invalid setting rest_port (IMAGEGATE_REST_PORT='http')" in setting_error.stderr


def test_docs_configuration_md_is_generated_from_the_table() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == docs_text(), "docs/configuration.md is stale: run `make docs`"
    for row in settings_table():
        assert f"| `{row.env}` |" in committed
        assert row.meaning in committed
