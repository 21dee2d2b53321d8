"""The `imagegate` command: run the servers, and manage accounts, credit and keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeAlias

# The CLI is the one place the two halves meet: `serve` runs both in one process.
from gateway.config import GatewayConfig
from gateway.server import bound_port, drain_gateway, start_gateway
from service import keys, logs, tracing
from service.admin_http import Refresh, start_admin
from service.catalog import Catalog, ModelSpec, load_catalog
from service.config import Config
from service.links import url_host
from service.money import credit_micros, format_usd, usd_to_micros
from service.providers.registry import ProviderStatus, build_registry
from service.server import Service, open_store, start_service
from service.store.base import (
    AccountExists,
    KeyLimits,
    Store,
    StoreError,
    UnknownAccount,
    UnknownCursor,
)

log = logging.getLogger("imagegate.cli")
DEMO_ACCOUNT = "demo"
DEMO_CREDIT = "5.00"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = Config.from_env(log_format=args.log_format)
        logs.setup(args.log_level, config.log_format)
        with asyncio.Runner(loop_factory=_loop_factory(config.uvloop)) as runner:
            return int(runner.run(args.func(args)) or 0)
    except (UnknownAccount, UnknownCursor, AccountExists, StoreError, ValueError) as exc:
        print(f"imagegate: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a port in use: say so, without a traceback
        print(f"imagegate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _loop_factory(uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when asked for and installed (not on Windows); else asyncio's."""
    if not uvloop:
        return None
    try:
        import uvloop as fast
    except ImportError:
        return None
    return fast.new_event_loop


Func = Callable[[argparse.Namespace], Awaitable[int]]
Group: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _command(
    group: Group, name: str, func: Func, help: str, *, store: bool = False
) -> argparse.ArgumentParser:
    p = group.add_parser(name, help=help, description=help)
    p.set_defaults(func=func)
    if store:
        _store_flags(p)
    return p


def _group(sub: Group, name: str, help: str) -> Group:
    return sub.add_parser(name, help=help).add_subparsers(required=True, metavar="ACTION")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegate", description="OpenAI-compatible image-generation gateway."
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="log lines as JSON objects, or text for a terminal [IMAGEGATE_LOG_FORMAT, json]",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = _command(sub, "serve", _serve, "Run gRPC and the REST front in one process.")
    _service_flags(serve)
    _rest_flags(serve)
    serve.add_argument(
        "--demo",
        action="store_true",
        help="on an empty database, create a 'demo' account and key and print them",
    )
    _service_flags(_command(sub, "serve-grpc", _serve_grpc, "Run only the gRPC ImageService."))
    rest = _command(
        sub, "serve-rest", _serve_rest, "Run only the REST front, in front of --grpc-target."
    )
    rest.add_argument("--host", help="address to bind [IMAGEGATE_HOST, 127.0.0.1]")
    _rest_flags(rest)
    rest.add_argument("--grpc-target", help="HOST:PORT of ImageService [IMAGEGATE_GRPC_TARGET]")
    rest.add_argument(
        "--metrics-address",
        help="HOST:PORT of /metrics, or off [IMAGEGATE_REST_METRICS_ADDRESS, 127.0.0.1:9465]",
    )
    _drain_flag(rest)

    accounts = _group(sub, "accounts", "Create and show accounts.")
    p = _command(accounts, "create", _accounts_create, "Create an account.", store=True)
    p.add_argument("name")
    p.add_argument("--credit", default="0", help="initial credit in USD, e.g. 10 or 2.50")
    p = _command(accounts, "show", _accounts_show, "Show an account's balance.", store=True)
    p.add_argument("name")
    p.add_argument("--json", action="store_true")

    credit = _group(sub, "credit", "Add prepaid credit.")
    p = _command(credit, "add", _credit_add, "Add credit in USD to an account.", store=True)
    p.add_argument("name")
    p.add_argument("usd")

    keys_cmd = _group(sub, "keys", "Create, list and revoke API keys.")
    p = _command(keys_cmd, "create", _keys_create, "Create a key; it is shown once.", store=True)
    p.add_argument("account")
    p.add_argument("--models", help="comma-separated model ids this key may use (default: all)")
    p.add_argument("--name", default="", help="a label to recognise the key by")
    _limit_flags(p)
    p = _command(
        keys_cmd,
        "limits",
        _keys_limits,
        "Show a key's limits, or change some: N (0 for none) or 'default' for the "
        "IMAGEGATE_LIMIT_* default.",
        store=True,
    )
    p.add_argument("key_id")
    _limit_flags(p)
    p = _command(
        keys_cmd,
        "list",
        _keys_list,
        "List an account's keys (never the keys themselves).",
        store=True,
    )
    p.add_argument("account")
    p = _command(keys_cmd, "revoke", _keys_revoke, "Revoke a key by its id (key_...).", store=True)
    p.add_argument("key_id")

    p = _command(
        sub,
        "models",
        _models,
        "List every catalog model with its routes, whether each is live, and its prices.",
    )
    p.add_argument("--catalog", type=Path, help="your model catalog TOML [IMAGEGATE_CATALOG]")
    p.add_argument("--json", action="store_true")

    p = _command(
        sub, "usage", _usage, "Show an account's recent requests and their cost.", store=True
    )
    p.add_argument("account")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after", help="a usage record id: only older records (paging)")
    p.add_argument("--json", action="store_true")

    _command(
        sub,
        "migrate",
        _migrate,
        "Bring the database schema up to date (needed for PostgreSQL; SQLite does it itself).",
        store=True,
    )
    return parser


LIMIT_FLAGS = {
    "rpm": "requests per minute",
    "ipm": "images per minute",
    "concurrency": "requests in flight at once",
    "max_n": "images per request",
}


def _limit_flags(p: argparse.ArgumentParser) -> None:
    for name, what in LIMIT_FLAGS.items():
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=_limit_value,
            metavar="N",
            help=f"{what}: N, 0 for no limit, 'default' for IMAGEGATE_LIMIT_{name.upper()}",
        )


class _Default:
    """`--rpm default`: back to the configured default (NULL in the store)."""


DEFAULT = _Default()


def _limit_value(text: str) -> int | _Default:
    if text == "default":
        return DEFAULT
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number or 'default': {text!r}")
    return int(text)


def _limit_changes(args: argparse.Namespace) -> dict[str, int | None]:
    changes: dict[str, int | None] = {}
    for name in LIMIT_FLAGS:
        value = getattr(args, name)
        if value is not None:
            changes[name] = None if value is DEFAULT else value
    return changes


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", type=Path, help="data directory [IMAGEGATE_DATA_DIR, ./.imagegate]"
    )
    p.add_argument(
        "--database-url",
        help="sqlite:///PATH or postgresql://USER@HOST/DB [IMAGEGATE_DATABASE_URL]",
    )


def _service_flags(p: argparse.ArgumentParser) -> None:
    _store_flags(p)
    p.add_argument("--host", help="address to bind [IMAGEGATE_HOST, 127.0.0.1]")
    p.add_argument("--grpc-port", type=int, help="gRPC port [IMAGEGATE_GRPC_PORT, 50051]")
    p.add_argument("--catalog", type=Path, help="your model catalog TOML [IMAGEGATE_CATALOG]")
    p.add_argument(
        "--public-url", help="base of image URLs when no front says [IMAGEGATE_PUBLIC_URL]"
    )
    p.add_argument(
        "--metrics-address",
        help="HOST:PORT of /metrics, or off [IMAGEGATE_METRICS_ADDRESS, 127.0.0.1:9464]",
    )
    _drain_flag(p)


def _drain_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drain-grace",
        dest="drain_grace_s",
        type=float,
        help="seconds calls in flight may take to end after SIGTERM [IMAGEGATE_DRAIN_GRACE_S, 25]",
    )


def _rest_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rest-port", type=int, help="REST port [IMAGEGATE_REST_PORT, 8080]")


def _config(args: argparse.Namespace) -> Config:
    fields = (
        "host",
        "grpc_port",
        "data_dir",
        "database_url",
        "catalog",
        "public_url",
        "metrics_address",
        "drain_grace_s",
    )
    return Config.from_env(**{f: getattr(args, f, None) for f in fields})


@contextlib.asynccontextmanager
async def _store(args: argparse.Namespace) -> AsyncIterator[Store]:
    store = open_store(_config(args))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# Servers


async def _serve(args: argparse.Namespace) -> int:
    config = _config(args)
    gateway_config = _gateway_config(args, grpc_target=None)
    rest_url = f"http://{url_host(gateway_config.host)}:{gateway_config.rest_port}"
    stop, force = _signals()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(_tracing())
        service = await start_service(config, rest_url=rest_url)
        stack.push_async_callback(service.stop)
        # The front dials the address the service is bound to, not a guess.
        target = f"{url_host(config.host)}:{service.port}"
        gateway_config = replace(gateway_config, grpc_target=target)
        runner = await start_gateway(gateway_config)
        stack.push_async_callback(runner.cleanup)
        # One listener for both halves: they share this process's registry.
        await _admin(stack, config.metrics_address, service.refresh_gauges)
        # The port really bound (--rest-port 0 picks one): image URLs for gRPC callers.
        rest_url = f"http://{url_host(gateway_config.host)}:{bound_port(runner)}"
        service.links.fallback_url = rest_url
        if args.demo:
            await _demo(service, rest_url)
        print(
            f"imagegate: REST on {rest_url}, gRPC on {config.host}:{service.port}. Ctrl-C stops.",
            flush=True,
        )
        await stop.wait()
        grace = config.drain_grace_s
        await asyncio.gather(service.drain(grace, force), drain_gateway(runner, grace, force))
    return 0


async def _serve_grpc(args: argparse.Namespace) -> int:
    config = _config(args)
    stop, force = _signals()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(_tracing())
        # No front in this process: image URLs for gRPC callers point at the default
        # REST address on this host, unless --public-url says otherwise.
        service = await start_service(config, rest_url=f"http://{url_host(config.host)}:8080")
        stack.push_async_callback(service.stop)
        await _admin(stack, config.metrics_address, service.refresh_gauges)
        print(f"imagegate: gRPC on {service.config.host}:{service.port}. Ctrl-C stops.", flush=True)
        await stop.wait()
        await service.drain(config.drain_grace_s, force)
    return 0


async def _serve_rest(args: argparse.Namespace) -> int:
    config = _gateway_config(
        args,
        grpc_target=args.grpc_target,
        rest_metrics_address=args.metrics_address,
        drain_grace_s=args.drain_grace_s,
    )
    stop, force = _signals()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(_tracing())
        runner = await start_gateway(config)
        stack.push_async_callback(runner.cleanup)
        await _admin(stack, config.rest_metrics_address)
        print(
            f"imagegate: REST on {config.host}:{config.rest_port} -> gRPC {config.grpc_target}. "
            "Ctrl-C stops.",
            flush=True,
        )
        await stop.wait()
        await drain_gateway(runner, config.drain_grace_s, force)
    return 0


def _gateway_config(
    args: argparse.Namespace, grpc_target: str | None, **overrides: Any
) -> GatewayConfig:
    return GatewayConfig.from_env(
        host=args.host, rest_port=args.rest_port, grpc_target=grpc_target, **overrides
    )


def _signals() -> tuple[asyncio.Event, asyncio.Event]:
    """(stop, force): the first SIGTERM or SIGINT starts the drain, the next one ends it."""
    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def received(name: str) -> None:
        if stop.is_set():
            log.warning("%s again: cancelling what is still in flight", name)
            force.set()
        else:
            log.info("%s: draining", name)
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, received, sig.name)
    return stop, force


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """OpenTelemetry tracing when the OTEL_* variables ask for it; flushed at the end."""
    shutdown = tracing.configure()
    try:
        yield
    finally:
        if shutdown is not None:
            shutdown()


async def _admin(
    stack: contextlib.AsyncExitStack, address: str, refresh: Refresh | None = None
) -> None:
    """The /metrics listener on `address` (none for "off"), stopped with the rest."""
    runner = await start_admin(address, refresh)
    if runner is not None:
        stack.push_async_callback(runner.cleanup)


async def _demo(service: Service, rest_url: str) -> None:
    store = service.store
    if await store.get_account(DEMO_ACCOUNT) is not None:
        print(
            f"imagegate: the '{DEMO_ACCOUNT}' account exists already; its key was shown when "
            f"it was made. For a new one: imagegate keys create {DEMO_ACCOUNT}",
            flush=True,
        )
        return
    await store.create_account(DEMO_ACCOUNT, usd_to_micros(DEMO_CREDIT))
    key = keys.new_key()
    await store.create_key(DEMO_ACCOUNT, keys.hash_key(key), keys.display_prefix(key), "demo", None)
    print(
        f"\nimagegate: created account '{DEMO_ACCOUNT}' with ${DEMO_CREDIT} of credit.\n"
        f"Your API key (shown once, keep it): {key}\n\nTry it:\n"
        f"  curl {rest_url}/v1/images/generations \\\n"
        f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        """    -d '{"model": "local", "prompt": "a lighthouse at dusk", "size": "512x512"}'\n""",
        flush=True,
    )


# Admin commands


async def _accounts_create(args: argparse.Namespace) -> int:
    async with _store(args) as store:
        account = await store.create_account(args.name, credit_micros(args.credit, allow_zero=True))
    print(f"created account {account.name} with {format_usd(account.balance_micros)}")
    return 0


async def _accounts_show(args: argparse.Namespace) -> int:
    async with _store(args) as store:
        account = await store.get_account(args.name)
        if account is None:
            raise UnknownAccount(f"no account named {args.name!r}")
        ledger = await store.ledger_sum(account.id)
    info = {
        "name": account.name,
        "balance_usd": format_usd(account.balance_micros),
        "balance_micros": account.balance_micros,
        "ledger_sum_micros": ledger,
        "created_at": _iso(account.created_at),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:18} {v}")
    return 0


async def _credit_add(args: argparse.Namespace) -> int:
    micros = credit_micros(args.usd)
    async with _store(args) as store:
        account = await store.add_credit(args.name, micros, "credit add")
    print(
        f"{account.name}: added {format_usd(micros)}, balance {format_usd(account.balance_micros)}"
    )
    return 0


async def _keys_create(args: argparse.Namespace) -> int:
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    key = keys.new_key()
    limits = KeyLimits(**_limit_changes(args))
    async with _store(args) as store:
        record = await store.create_key(
            args.account, keys.hash_key(key), keys.display_prefix(key), args.name, models, limits
        )
    print(
        f"created {record.id} for {record.account_name}"
        f"{' (models: ' + ', '.join(models) + ')' if models else ''}"
    )
    print(f"key (shown once): {key}")
    return 0


async def _keys_limits(args: argparse.Namespace) -> int:
    async with _store(args) as store:
        record = await store.set_key_limits(args.key_id, _limit_changes(args))
    if record is None:
        print(f"imagegate: no key {args.key_id}", file=sys.stderr)
        return 1
    print(f"{record.id}: {_limits_text(record.limits)}")
    return 0


def _limits_text(limits: KeyLimits) -> str:
    """rpm=10 ipm=default ...; 0 shows as 'none'."""
    values = {name: getattr(limits, name) for name in LIMIT_FLAGS}
    return " ".join(
        f"{name}={'default' if v is None else 'none' if v == 0 else v}"
        for name, v in values.items()
    )


async def _keys_list(args: argparse.Namespace) -> int:
    async with _store(args) as store:
        if await store.get_account(args.account) is None:
            raise UnknownAccount(f"no account named {args.account!r}")
        records = await store.list_keys(args.account)
    print(f"{'id':22} {'key':16} {'name':12} {'models':20} {'created':20} {'status':28} limits")
    for r in records:
        status = f"revoked {_iso(r.revoked_at)}" if r.revoked_at else "active"
        models = ",".join(r.models) if r.models is not None else "*"
        print(
            f"{r.id:22} {r.prefix:16} {r.name:12} {models:20} {_iso(r.created_at):20} "
            f"{status:28} {_limits_text(r.limits)}"
        )
    return 0


async def _keys_revoke(args: argparse.Namespace) -> int:
    async with _store(args) as store:
        revoked = await store.revoke_key(args.key_id)
    if not revoked:
        print(f"imagegate: no active key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


async def _usage(args: argparse.Namespace) -> int:
    async with _store(args) as store:
        if await store.get_account(args.account) is None:
            raise UnknownAccount(f"no account named {args.account!r}")
        # The store query GET /v1/usage reads too.
        rows = await store.usage(args.account, args.limit, args.after)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]))
        return 0
    print(
        f"{'time':20} {'id':28} {'key':20} {'model':14} {'n':>2} {'size':10} {'quality':8} "
        f"{'cost':>10} {'status':9} {'latency':>8} {'upstream cost':>13} route"
    )
    for r in rows:
        route = f"{r.provider}/{r.upstream_model}" if r.provider else ""
        latency = "" if r.latency_ms is None else f"{r.latency_ms}ms"
        print(
            f"{_iso(r.created_at):20} {r.id:28} {r.key_id:20} {r.model:14} {r.n:>2} "
            f"{r.size:10} {r.quality:8} {format_usd(r.cost_micros):>10} {r.status:9} "
            f"{latency:>8} {format_usd(r.upstream_cost_micros):>13} {route}"
        )
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    store = open_store(_config(args))
    applied = await store.open(migrate=True)
    try:
        version = await store.schema_version()
    finally:
        await store.close()
    for name in applied:
        print(f"applied {name}")
    print(f"schema at version {version}{'' if applied else ', up to date'}")
    return 0


async def _models(args: argparse.Namespace) -> int:
    catalog = load_catalog(_config(args).catalog)
    # The table says what is missing; the registry's start-up lines would repeat it.
    logging.getLogger("imagegate.providers").setLevel(logging.ERROR)
    registry = await build_registry(catalog.providers, os.environ)
    await registry.aclose()
    models = [_model_info(catalog, catalog.models[i], registry.status) for i in catalog.ids()]
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in models]))
        return 0
    for m in models:
        served = "served" if m.served else "not served"
        print(f"{m.id}  [{m.family or '-'}]  {served}  {m.prices}")
        for r in m.routes:
            state = "live" if r.live else f"not live: {r.missing}"
            print(f"    {r.provider}/{r.upstream_model} ({r.kind}): {state}")
    return 0


@dataclasses.dataclass(frozen=True)
class _RouteInfo:
    provider: str
    upstream_model: str
    kind: str
    live: bool
    missing: str


@dataclasses.dataclass(frozen=True)
class _ModelInfo:
    id: str
    family: str
    served: bool
    prices: str
    # "quality/size" -> micro-USD per image.
    prices_micros: dict[str, int]
    routes: list[_RouteInfo]


def _model_info(catalog: Catalog, spec: ModelSpec, status: dict[str, ProviderStatus]) -> _ModelInfo:
    routes = [
        _RouteInfo(
            r.provider,
            r.upstream_model,
            catalog.providers[r.provider].kind,
            status[r.provider].live,
            status[r.provider].missing,
        )
        for r in spec.routes
    ]
    return _ModelInfo(
        id=spec.id,
        family=spec.family,
        served=any(r.live for r in routes),
        prices=_price_text(spec),
        prices_micros={f"{q}/{s}": p for (s, q), p in sorted(spec.prices.items())},
        routes=routes,
    )


def _price_text(spec: ModelSpec) -> str:
    prices = sorted(set(spec.prices.values()))
    if not prices:
        text = "unpriced"
    elif len(prices) == 1:
        text = f"{format_usd(prices[0])} per image"
    else:
        text = f"{format_usd(prices[0])}-{format_usd(prices[-1])} per image"
    t = spec.token_prices
    if t is not None:
        text += (
            f"; charged by tokens per 1M: text in {format_usd(t.text_input)}, "
            f"image in {format_usd(t.image_input)}, out {format_usd(t.output)}"
        )
    return text


def _iso(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else ""


if __name__ == "__main__":
    sys.exit(main())
