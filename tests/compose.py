"""docker-compose.yml as `docker compose` reads it, for tests on a machine without Docker.

YAML merge keys (`<<`) come from PyYAML; `${VAR}`, `${VAR:-default}`,
`${VAR-default}`, `${VAR:?error}`, `${VAR?error}` and `$$` are interpolated here as
Compose does. The Envoy config that compose runs is envoy.yaml through the
compose service's own `sed` expression.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENVOY_YAML = REPO / "envoy.yaml"
REPLICAS = ("imagegate-1", "imagegate-2")
# The services built from this repository's Dockerfile.
OWN_IMAGE = ("create-bucket", "migrate", *REPLICAS, "console")
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is not set: compose refuses to start."""


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = load()["services"]
    return found


def interpolate(value: str, env: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name = match[1] or match[4]
        operator, argument = match[2], match[3]
        current = env.get(name)
        unset = current is None or (
            operator is not None and operator.startswith(":") and not current
        )
        if operator and operator.endswith("?") and unset:
            raise MissingVariable(f"{name}: {argument}")
        if operator and operator.endswith("-") and unset:
            return argument
        return current or ""

    return _VARIABLE.sub(one, value)


def environment(service: str, env: Mapping[str, str]) -> dict[str, str]:
    """A service's environment after interpolation with `env` (the host's variables)."""
    raw: dict[str, object] = services()[service].get("environment", {})
    return {name: interpolate(str(value), env) for name, value in raw.items()}


def envoy_rewrite() -> str:
    """The `sed` script the compose `envoy` service applies to envoy.yaml."""
    return interpolate(services()["envoy"]["environment"]["ENVOY_REWRITE"], {})


def envoy_config_text() -> str:
    """envoy.yaml rewritten by the compose `envoy` service's own command."""
    return subprocess.run(
        ["sed", "-e", envoy_rewrite(), str(ENVOY_YAML)], capture_output=True, text=True, check=True
    ).stdout


def envoy_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(envoy_config_text())
    return data


def cluster_endpoints(config: dict[str, Any], name: str = "imagegate") -> list[dict[str, Any]]:
    """The socket addresses of a cluster (the replicas' by default), in order."""
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return [
        endpoint["endpoint"]["address"]["socket_address"]
        for locality in cluster["load_assignment"]["endpoints"]
        for endpoint in locality["lb_endpoints"]
    ]
