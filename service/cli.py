"""The `imagegate` command: run the servers, and manage accounts, credit and keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeAlias

# The CLI is the one place the two halves meet: `serve` runs both in one process.
from gateway.server import bound_port, drain_gateway, start_gateway
from service import aio, heap, logs, tracing, workers
from service.admin import Admin, ModelInfo, model_infos, route_text
from service.admin_http import Refresh, start_admin
from service.catalog import load_catalog
from service.config import Config
from service.config_commands import add_config_commands, load_config, load_front, settings_table
from service.errors import ImagegateError
from service.lifecycle import stop_signals
from service.links import url_host
from service.money import format_usd, usd_to_micros
from service.providers.registry import build_registry
from service.server import open_store, start_service
from service.store.base import (
    AccountExists,
    KeyLimits,
    Store,
    StoreError,
    UnknownAccount,
    UnknownCursor,
    UsageBucketRow,
)
from settings.flags import add_flags
from settings.loader import SettingError

log = logging.getLogger("imagegate.cli")
DEMO_ACCOUNT = "demo"
DEMO_CREDIT = "5.00"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        # Read once, before anything starts: a bad setting stops here, naming itself.
        args.config = load_config(args) if args.environment else Config()
        if args.front:
            args.front_config = load_front(args)
    except SettingError as exc:
        print(f"imagegate: {exc}", file=sys.stderr)
        return 2
    try:
        logs.setup(args.config.log_level, args.config.log_format)
        with asyncio.Runner(loop_factory=aio.loop_factory(args.config.uvloop)) as runner:
            return int(runner.run(args.func(args)) or 0)
    except SettingError as exc:
        print(f"imagegate: {exc}", file=sys.stderr)
        return 2
    except (UnknownAccount, UnknownCursor, AccountExists, StoreError, ValueError) as exc:
        print(f"imagegate: {exc}", file=sys.stderr)
        return 1
    except ImagegateError as exc:  # the admin operations' errors, as the API words them
        print(f"imagegate: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a port in use: say so, without a traceback
        print(f"imagegate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


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
    # Settings are declared in the config dataclasses; their flags are made from them.
    table = settings_table()
    add_flags(parser, table, "imagegate")
    parser.set_defaults(front=False, environment=True)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = _command(
        sub,
        "serve",
        _serve,
        "Run gRPC and the REST front: N processes of each under one supervisor, or both "
        "in one process with --workers 1.",
    )
    add_flags(serve, table, "serve")
    serve.set_defaults(front=True)
    serve.add_argument(
        "--demo",
        action="store_true",
        help="on an empty database, create a 'demo' account and key and print them",
    )
    grpc_only = _command(sub, "serve-grpc", _serve_grpc, "Run only the gRPC ImageService.")
    add_flags(grpc_only, table, "serve-grpc")
    rest = _command(
        sub, "serve-rest", _serve_rest, "Run only the REST front, in front of --grpc-target."
    )
    add_flags(rest, table, "serve-rest")
    rest.set_defaults(front=True)

    accounts = _group(sub, "accounts", "Create and show accounts.")
    p = _command(accounts, "create", _accounts_create, "Create an account.", store=True)
    p.add_argument("name")
    p.add_argument("--credit", help="initial credit in USD, e.g. 10 or 2.50")
    p = _command(
        accounts,
        "show",
        _accounts_show,
        "Show an account's balance and last ledger entries.",
        store=True,
    )
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p = _command(accounts, "list", _accounts_list, "List every account.", store=True)
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
        keys_cmd,
        "models",
        _keys_models,
        "Set the models a key may use ('' for every model).",
        store=True,
    )
    p.add_argument("key_id")
    p.add_argument("models", help="comma-separated model ids")

    admin_keys = _group(
        sub, "admin-keys", "Create, list and revoke admin keys (for the /admin/v1 API)."
    )
    p = _command(
        admin_keys,
        "create",
        _admin_keys_create,
        "Create an admin key; it is shown once.",
        store=True,
    )
    p.add_argument("name", help="a label to recognise the key by")
    _command(admin_keys, "list", _admin_keys_list, "List the admin keys.", store=True)
    p = _command(
        admin_keys,
        "revoke",
        _admin_keys_revoke,
        "Revoke an admin key by its id (adm_...).",
        store=True,
    )
    p.add_argument("key_id")

    p = _command(
        sub,
        "models",
        _models,
        "List every catalog model with its routes, whether each is live, and its prices.",
    )
    add_flags(p, table, "models")
    p.add_argument("--json", action="store_true")

    p = _command(
        sub, "usage", _usage, "Show an account's recent requests and their cost.", store=True
    )
    p.add_argument("account")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after", help="a usage record id: only older records (paging)")
    p.add_argument(
        "--by-day", action="store_true", help="requests and spend by day x model x key x route"
    )
    p.add_argument("--days", type=int, default=30, help="with --by-day: days back, 1-366")
    p.add_argument("--json", action="store_true")

    _command(
        sub,
        "migrate",
        _migrate,
        "Bring the database schema up to date (needed for PostgreSQL; SQLite does it itself).",
        store=True,
    )
    add_config_commands(sub)
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
    add_flags(p, settings_table(), "admin")


def _config(args: argparse.Namespace) -> Config:
    config: Config = args.config
    return config


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
    config, gateway_config = _config(args), args.front_config
    count = config.workers or workers.default_workers()
    if count > 1:

        async def prepare(rest_url: str) -> None:
            if args.demo:
                async with _store(args) as store:
                    await _demo(store, rest_url)

        return await workers.supervise(
            config,
            replace(gateway_config, drain_grace_s=config.drain_grace_s),
            count,
            config.log_level,
            prepare,
        )
    rest_url = f"http://{url_host(gateway_config.host)}:{gateway_config.rest_port}"
    stop, force = stop_signals()
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
            await _demo(service.store, rest_url)
        _ready(f"REST on {rest_url}, gRPC on {config.host}:{service.port}")
        await stop.wait()
        grace = config.drain_grace_s
        await asyncio.gather(service.drain(grace, force), drain_gateway(runner, grace, force))
    return 0


def _ready(listening: str) -> None:
    heap.freeze_start_up()
    print(f"imagegate: {listening}. Ctrl-C stops.", flush=True)


async def _serve_grpc(args: argparse.Namespace) -> int:
    config = _config(args)
    stop, force = stop_signals()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(_tracing())
        # No front in this process: image URLs for gRPC callers point at the default
        # REST address on this host, unless --public-url says otherwise.
        service = await start_service(config, rest_url=f"http://{url_host(config.host)}:8080")
        stack.push_async_callback(service.stop)
        await _admin(stack, config.metrics_address, service.refresh_gauges)
        _ready(f"gRPC on {service.config.host}:{service.port}")
        await stop.wait()
        await service.drain(config.drain_grace_s, force)
    return 0


async def _serve_rest(args: argparse.Namespace) -> int:
    config = args.front_config
    stop, force = stop_signals()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(_tracing())
        runner = await start_gateway(config)
        stack.push_async_callback(runner.cleanup)
        await _admin(stack, config.rest_metrics_address)
        _ready(f"REST on {config.host}:{config.rest_port} -> gRPC {config.grpc_target}")
        await stop.wait()
        await drain_gateway(runner, config.drain_grace_s, force)
    return 0


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


async def _demo(store: Store, rest_url: str) -> None:
    if await store.get_account(DEMO_ACCOUNT) is not None:
        print(
            f"imagegate: the '{DEMO_ACCOUNT}' account exists already; its key was shown when "
            f"it was made. For a new one: imagegate keys create {DEMO_ACCOUNT}",
            flush=True,
        )
        return
    admin = Admin(store)
    await admin.create_account(DEMO_ACCOUNT, DEMO_CREDIT)
    key, _ = await admin.create_key(DEMO_ACCOUNT, "demo")
    print(
        f"\nimagegate: created account '{DEMO_ACCOUNT}' with ${DEMO_CREDIT} of credit.\n"
        f"Your API key (shown once, keep it): {key}\n\nTry it:\n"
        f"  curl {rest_url}/v1/images/generations \\\n"
        f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        """    -d '{"model": "local", "prompt": "a lighthouse at dusk", "size": "512x512"}'\n""",
        flush=True,
    )


# Admin commands: each the admin API's operation (service/admin.py) on the database.


@contextlib.asynccontextmanager
async def _admin_api(args: argparse.Namespace) -> AsyncIterator[Admin]:
    async with _store(args) as store:
        yield Admin(store)


async def _accounts_create(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        account = await admin.create_account(args.name, args.credit)
    print(f"created account {account.name} with {format_usd(account.balance_micros)}")
    return 0


async def _accounts_list(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        accounts = await admin.list_accounts()
    if args.json:
        print(json.dumps([dataclasses.asdict(a) for a in accounts]))
        return 0
    print(f"{'name':24} {'balance':>16} {'held':>12} created")
    for a in accounts:
        print(
            f"{a.name:24} {format_usd(a.balance_micros):>16} {format_usd(a.held_micros):>12} "
            f"{_iso(a.created_at)}"
        )
    return 0


async def _accounts_show(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        detail = await admin.show_account(args.name)
        ledger = await admin.ledger_sum(detail.account.id)
    account = detail.account
    info = {
        "name": account.name,
        "balance_usd": format_usd(account.balance_micros),
        "balance_micros": account.balance_micros,
        "held_micros": account.held_micros,
        "ledger_sum_micros": ledger,
        "created_at": _iso(account.created_at),
    }
    if args.json:
        print(json.dumps(info | {"ledger": [dataclasses.asdict(e) for e in detail.ledger]}))
        return 0
    for k, v in info.items():
        print(f"{k:18} {v}")
    if detail.ledger:
        print(f"\nlast {len(detail.ledger)} ledger entries, newest first:")
    for e in detail.ledger:
        print(
            f"  {_iso(e.created_at):20} {e.kind:7} {format_usd(e.amount_micros):>14} "
            f"{format_usd(e.balance_micros):>14} {e.request_id or e.note}"
        )
    return 0


async def _credit_add(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        account = await admin.credit(args.name, args.usd, "credit add")
    # The amount was accepted, so it parses.
    print(
        f"{account.name}: added {format_usd(usd_to_micros(args.usd))}, "
        f"balance {format_usd(account.balance_micros)}"
    )
    return 0


async def _keys_create(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    limits = KeyLimits(**_limit_changes(args))
    async with _admin_api(args) as admin:
        key, view = await admin.create_key(args.account, args.name, models, limits)
    record = view.record
    print(
        f"created {record.id} for {record.account_name}"
        f"{' (models: ' + ', '.join(record.models) + ')' if record.models else ''}"
    )
    print(f"key (shown once): {key}")
    return 0


async def _keys_limits(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        view = await admin.update_key(args.key_id, limits=_limit_changes(args))
    print(f"{view.record.id}: {_limits_text(view.record.limits)}")
    return 0


async def _keys_models(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    async with _admin_api(args) as admin:
        view = await admin.update_key(args.key_id, models=models, set_models=True)
    print(f"{view.record.id}: models {','.join(view.record.models or ()) or '*'}")
    return 0


def _limits_text(limits: KeyLimits) -> str:
    """rpm=10 ipm=default ...; 0 shows as 'none'."""
    values = {name: getattr(limits, name) for name in LIMIT_FLAGS}
    return " ".join(
        f"{name}={'default' if v is None else 'none' if v == 0 else v}"
        for name, v in values.items()
    )


async def _keys_list(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        views = await admin.list_keys(args.account)
    print(
        f"{'id':22} {'key':16} {'name':12} {'models':20} {'created':20} {'last used':20} "
        f"{'status':28} limits"
    )
    for view in views:
        r = view.record
        status = f"revoked {_iso(r.revoked_at)}" if r.revoked_at else "active"
        models = ",".join(r.models) if r.models is not None else "*"
        print(
            f"{r.id:22} {r.prefix:16} {r.name:12} {models:20} {_iso(r.created_at):20} "
            f"{_iso(view.last_used) or '-':20} {status:28} {_limits_text(r.limits)}"
        )
    return 0


async def _keys_revoke(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        if (await admin.get_key(args.key_id)).record.revoked_at is not None:
            print(f"imagegate: no active key {args.key_id}", file=sys.stderr)
            return 1
        await admin.revoke_key(args.key_id)
    print(f"revoked {args.key_id}")
    return 0


async def _admin_keys_create(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        key, record = await admin.create_admin_key(args.name)
    print(f"created admin key {record.id} ({record.name})")
    print(f"admin key (shown once): {key}")
    return 0


async def _admin_keys_list(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        records = await admin.list_admin_keys()
    print(f"{'id':22} {'key':20} {'name':16} {'created':20} status")
    for r in records:
        status = f"revoked {_iso(r.revoked_at)}" if r.revoked_at else "active"
        print(f"{r.id:22} {r.prefix:20} {r.name:16} {_iso(r.created_at):20} {status}")
    return 0


async def _admin_keys_revoke(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        await admin.revoke_admin_key(args.key_id)
    print(f"revoked {args.key_id}")
    return 0


async def _usage(args: argparse.Namespace) -> int:
    async with _admin_api(args) as admin:
        if args.by_day:
            return _print_buckets(args, await admin.usage_by_day(args.account, str(args.days)))
        # The operation GET /admin/v1/requests (and /v1/usage's store query) runs.
        page, _ = await admin.requests(args.account, str(args.limit), args.after or "")
    rows = [item.row for item in page]
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]))
        return 0
    print(
        f"{'time':20} {'id':28} {'key':20} {'model':14} {'n':>2} {'size':10} {'quality':8} "
        f"{'cost':>10} {'status':9} {'latency':>8} {'upstream cost':>13} route"
    )
    for r in rows:
        latency = "" if r.latency_ms is None else f"{r.latency_ms}ms"
        print(
            f"{_iso(r.created_at):20} {r.id:28} {r.key_id:20} {r.model:14} {r.n:>2} "
            f"{r.size:10} {r.quality:8} {format_usd(r.cost_micros):>10} {r.status:9} "
            f"{latency:>8} {format_usd(r.upstream_cost_micros):>13} "
            f"{route_text(r.provider, r.upstream_model)}"
        )
    return 0


def _print_buckets(args: argparse.Namespace, buckets: list[UsageBucketRow]) -> int:
    if args.json:
        print(json.dumps([dataclasses.asdict(b) for b in buckets]))
        return 0
    print(f"{'day':10} {'model':14} {'key':20} {'requests':>8} {'images':>6} {'spend':>12} route")
    for b in buckets:
        print(
            f"{b.day:10} {b.model:14} {b.key_id:20} {b.requests:>8} {b.images:>6} "
            f"{format_usd(b.spend_micros):>12} {route_text(b.provider, b.upstream_model)}"
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
    # GET /admin/v1/models's operation; no service runs here, so no breaker has tripped.
    models = model_infos(catalog, registry.status, [])
    if args.json:
        print(json.dumps([_model_json(m) for m in models]))
        return 0
    for m in models:
        served = "served" if m.served else "not served"
        print(f"{m.id}  [{m.family or '-'}]  {served}  {_price_text(m)}")
        for r in m.routes:
            state = "live" if r.live else f"not live: {r.missing}"
            print(f"    {r.provider}/{r.upstream_model} ({r.kind}): {state}")
    return 0


def _model_json(m: ModelInfo) -> dict[str, Any]:
    return {
        "id": m.id,
        "family": m.family,
        "served": m.served,
        "prices": _price_text(m),
        # "quality/size" -> micro-USD per image.
        "prices_micros": {f"{q}/{s}": p for s, q, p in m.prices},
        "routes": [
            {
                "provider": r.provider,
                "upstream_model": r.upstream_model,
                "kind": r.kind,
                "live": r.live,
                "missing": r.missing,
                "breaker": r.breaker,
            }
            for r in m.routes
        ],
    }


def _price_text(spec: ModelInfo) -> str:
    prices = sorted({p for _, _, p in spec.prices})
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
