"""AdminService over gRPC: protobuf in, service/admin.py call, protobuf out. Nothing else."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import struct_pb2
from imagegate.v1 import accounts_pb2, admin_pb2, admin_pb2_grpc

from service import observe
from service.admin import Admin, KeyView, ModelInfo, route_text
from service.errors import ImagegateError, InvalidParameter
from service.grpc_errors import abort, internal_status, to_status
from service.store.base import (
    LIMIT_FIELDS,
    AccountSummary,
    AccountUsageRow,
    KeyLimits,
    LedgerRow,
    UsageBucketRow,
    UsageRow,
)

log = logging.getLogger("imagegate.admin")
T = TypeVar("T")


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=_HasId)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin) -> None:
        self._admin = admin

    async def CreateAccount(
        self, request: admin_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        async def call() -> admin_pb2.Account:
            return _account(
                await self._admin.create_account(request.name, request.credit_usd or None)
            )

        return await self._run(context, call)

    async def ListAccounts(
        self, request: admin_pb2.ListAccountsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AccountList:
        async def call() -> admin_pb2.AccountList:
            accounts = await self._admin.list_accounts()
            return admin_pb2.AccountList(object="list", data=[_account(a) for a in accounts])

        return await self._run(context, call)

    async def GetAccount(
        self, request: admin_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AccountDetail:
        async def call() -> admin_pb2.AccountDetail:
            detail = await self._admin.show_account(request.account)
            return admin_pb2.AccountDetail(
                account=_account(detail.account), ledger=[_ledger(e) for e in detail.ledger]
            )

        return await self._run(context, call)

    async def CreditAccount(
        self, request: admin_pb2.CreditAccountRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Account:
        async def call() -> admin_pb2.Account:
            credit = request.credit
            account = await self._admin.credit(request.account, credit.amount_usd, credit.note)
            return _account(account)

        return await self._run(context, call)

    async def CreateKey(
        self, request: admin_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.CreatedKey:
        async def call() -> accounts_pb2.CreatedKey:
            limits = KeyLimits(**{f: _limit(request.limits, f) for f in LIMIT_FIELDS})
            key, view = await self._admin.create_key(
                request.account, request.name, list(request.models), limits
            )
            return accounts_pb2.CreatedKey(key=key, info=key_info(view))

        return await self._run(context, call)

    async def ListKeys(
        self, request: admin_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.KeyList:
        async def call() -> accounts_pb2.KeyList:
            return key_list(await self._admin.list_keys(request.account or None))

        return await self._run(context, call)

    async def UpdateKey(
        self, request: admin_pb2.UpdateKeyRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.KeyInfo:
        async def call() -> accounts_pb2.KeyInfo:
            update = request.update
            limits = {
                f: _limit(update.limits, f) for f in LIMIT_FIELDS if update.limits.HasField(f)
            }
            view = await self._admin.update_key(
                request.key_id,
                models=model_ids(update.models) if update.HasField("models") else None,
                set_models=update.HasField("models"),
                limits=limits,
            )
            return key_info(view)

        return await self._run(context, call)

    async def RevokeKey(
        self, request: admin_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.KeyInfo:
        async def call() -> accounts_pb2.KeyInfo:
            return key_info(await self._admin.revoke_key(request.key_id))

        return await self._run(context, call)

    async def GetUsage(
        self, request: admin_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.UsageBucketList:
        async def call() -> accounts_pb2.UsageBucketList:
            return bucket_list(await self._admin.usage_by_day(request.account, request.days))

        return await self._run(context, call)

    async def ListRequests(
        self, request: admin_pb2.ListRequestsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RequestList:
        async def call() -> admin_pb2.RequestList:
            rows, has_more = await self._admin.requests(
                request.account, request.limit, request.after
            )
            return admin_pb2.RequestList(**page([_request(row) for row in rows], has_more))

        return await self._run(context, call)

    async def ListModelRoutes(
        self, request: admin_pb2.ListModelRoutesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ModelInfoList:
        async def call() -> admin_pb2.ModelInfoList:
            models = [_model(m) for m in self._admin.models()]
            return admin_pb2.ModelInfoList(object="list", data=models)

        return await self._run(context, call)

    async def _run(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
        """Every call: the admin key first, then the operation; errors by the one table."""
        try:
            await self._admin.authenticate(_metadata(context, "authorization"))
            return await call()
        except ImagegateError as err:
            await abort(context, to_status(err))
        except Exception:
            log.exception("admin request %s failed", observe.current().request_id)
            await abort(context, internal_status())


# Messages both services send (ImageService's own-key calls use them too).


def key_info(view: KeyView) -> accounts_pb2.KeyInfo:
    r = view.record
    limits = accounts_pb2.KeyLimits()
    for name in LIMIT_FIELDS:
        value = getattr(r.limits, name)
        if value is not None:
            setattr(limits, name, value)
    return accounts_pb2.KeyInfo(
        id=r.id,
        prefix=r.prefix,
        name=r.name,
        account=r.account_name,
        models=list(r.models or ()),
        limits=limits,
        created=int(r.created_at),
        last_used=int(view.last_used or 0),
        revoked=r.revoked_at is not None,
    )


def page(records: Sequence[R], has_more: bool) -> dict[str, Any]:
    """The fields of an OpenAI-shaped list page (`after` = the last page's last_id)."""
    return {
        "object": "list",
        "data": records,
        "has_more": has_more,
        "first_id": records[0].id if records else "",
        "last_id": records[-1].id if records else "",
    }


def key_list(views: Sequence[KeyView]) -> accounts_pb2.KeyList:
    return accounts_pb2.KeyList(object="list", data=[key_info(v) for v in views])


def bucket_list(rows: Sequence[UsageBucketRow]) -> accounts_pb2.UsageBucketList:
    return accounts_pb2.UsageBucketList(
        object="list",
        data=[
            accounts_pb2.UsageBucket(
                day=b.day,
                model=b.model,
                key_id=b.key_id,
                route=route_text(b.provider, b.upstream_model),
                requests=b.requests,
                images=b.images,
                spend_micros=b.spend_micros,
            )
            for b in rows
        ],
    )


def model_ids(models: struct_pb2.ListValue) -> list[str]:
    """A JSON list of model ids; anything but strings in it is a 400."""
    ids = []
    for value in models.values:
        if value.WhichOneof("kind") != "string_value":
            raise InvalidParameter(
                "Invalid 'models': give a list of model ids (an empty list for every model).",
                param="models",
            )
        ids.append(value.string_value)
    return ids


def _limit(limits: accounts_pb2.KeyLimits, name: str) -> int | None:
    return getattr(limits, name) if limits.HasField(name) else None


def _account(a: AccountSummary) -> admin_pb2.Account:
    return admin_pb2.Account(
        name=a.name,
        balance_micros=a.balance_micros,
        held_micros=a.held_micros,
        created=int(a.created_at),
    )


def _ledger(e: LedgerRow) -> admin_pb2.LedgerEntry:
    return admin_pb2.LedgerEntry(
        id=str(e.id),
        created=int(e.created_at),
        kind=e.kind,
        amount_micros=e.amount_micros,
        balance_micros=e.balance_micros,
        request_id=e.request_id,
        note=e.note,
    )


def _request(item: AccountUsageRow) -> admin_pb2.RequestRecord:
    return admin_pb2.RequestRecord(**usage_fields(item.row), account=item.account)


def usage_fields(row: UsageRow) -> dict[str, Any]:
    """A usage row as the fields of GET /v1/usage's UsageRecord (RequestRecord adds the
    account)."""
    return dict(
        id=row.id,
        object="usage_record",
        created=int(row.created_at),
        request_id=row.request_id,
        key_id=row.key_id,
        model=row.model,
        route=route_text(row.provider, row.upstream_model),
        n=row.n,
        size=row.size,
        quality=row.quality,
        cost_micros=row.cost_micros,
        quoted_micros=row.quoted_micros,
        latency_ms=row.latency_ms or 0,
        status=row.status,
    )


def _model(m: ModelInfo) -> admin_pb2.ModelInfo:
    return admin_pb2.ModelInfo(
        id=m.id,
        prices=[admin_pb2.Price(size=s, quality=q, micros=p) for s, q, p in m.prices],
        routes=[
            admin_pb2.RouteInfo(
                provider=r.provider,
                kind=r.kind,
                upstream_model=r.upstream_model,
                live=r.live,
                breaker=r.breaker,
                missing=r.missing,
            )
            for r in m.routes
        ],
        family=m.family,
    )


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    return None
