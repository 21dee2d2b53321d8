"""Run the aiohttp front on its own (serve-rest) or beside the service (serve)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway import log_redaction, memory
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.protocol import make_runner
from gateway.telemetry import LIFECYCLE


async def start_gateway(
    config: GatewayConfig, port: int | None = None, *, reuse_port: bool = False
) -> web.AppRunner:
    """Start on config.host:port (config.rest_port by default; 0 picks a free port).
    `reuse_port`: several front processes of `serve --workers N` share the port."""
    log_redaction.install()
    memory.keep_large_blocks()
    runner = make_runner(create_app(config), config)
    await runner.setup()
    site = web.TCPSite(
        runner, config.host, config.rest_port if port is None else port, reuse_port=reuse_port
    )
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("gateway is not listening")


async def drain_gateway(runner: web.AppRunner, grace_s: float, force: asyncio.Event) -> None:
    """Refuse new requests (503, /readyz unready) and let those in flight end within
    `grace_s` or until `force`; cancel the rest. runner.cleanup() afterwards."""
    await runner.app[LIFECYCLE].drain(grace_s, force)
