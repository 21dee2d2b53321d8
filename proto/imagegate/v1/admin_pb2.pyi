from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from imagegate.v1 import accounts_pb2 as _accounts_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Account(_message.Message):
    __slots__ = ("name", "balance_micros", "held_micros", "created")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BALANCE_MICROS_FIELD_NUMBER: _ClassVar[int]
    HELD_MICROS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    balance_micros: int
    held_micros: int
    created: int
    def __init__(self, name: _Optional[str] = ..., balance_micros: _Optional[int] = ..., held_micros: _Optional[int] = ..., created: _Optional[int] = ...) -> None: ...

class AccountList(_message.Message):
    __slots__ = ("object", "data")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[Account]
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[Account, _Mapping]]] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("id", "created", "kind", "amount_micros", "balance_micros", "request_id", "note")
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MICROS_FIELD_NUMBER: _ClassVar[int]
    BALANCE_MICROS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    id: str
    created: int
    kind: str
    amount_micros: int
    balance_micros: int
    request_id: str
    note: str
    def __init__(self, id: _Optional[str] = ..., created: _Optional[int] = ..., kind: _Optional[str] = ..., amount_micros: _Optional[int] = ..., balance_micros: _Optional[int] = ..., request_id: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class AccountDetail(_message.Message):
    __slots__ = ("account", "ledger")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    account: Account
    ledger: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ..., ledger: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ...) -> None: ...

class CreateAccountRequest(_message.Message):
    __slots__ = ("name", "credit_usd")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREDIT_USD_FIELD_NUMBER: _ClassVar[int]
    name: str
    credit_usd: str
    def __init__(self, name: _Optional[str] = ..., credit_usd: _Optional[str] = ...) -> None: ...

class ListAccountsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetAccountRequest(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: str
    def __init__(self, account: _Optional[str] = ...) -> None: ...

class CreditAccountRequest(_message.Message):
    __slots__ = ("account", "credit")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    account: str
    credit: Credit
    def __init__(self, account: _Optional[str] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("amount_usd", "note")
    AMOUNT_USD_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    amount_usd: str
    note: str
    def __init__(self, amount_usd: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("account", "name", "models", "limits")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    account: str
    name: str
    models: _containers.RepeatedScalarFieldContainer[str]
    limits: _accounts_pb2.KeyLimits
    def __init__(self, account: _Optional[str] = ..., name: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[_accounts_pb2.KeyLimits, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: str
    def __init__(self, account: _Optional[str] = ...) -> None: ...

class UpdateKeyRequest(_message.Message):
    __slots__ = ("key_id", "update")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    update: KeyUpdate
    def __init__(self, key_id: _Optional[str] = ..., update: _Optional[_Union[KeyUpdate, _Mapping]] = ...) -> None: ...

class KeyUpdate(_message.Message):
    __slots__ = ("models", "limits")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    models: _struct_pb2.ListValue
    limits: _accounts_pb2.KeyLimits
    def __init__(self, models: _Optional[_Union[_struct_pb2.ListValue, _Mapping]] = ..., limits: _Optional[_Union[_accounts_pb2.KeyLimits, _Mapping]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("account", "days")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    account: str
    days: str
    def __init__(self, account: _Optional[str] = ..., days: _Optional[str] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ("account", "limit", "after")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    account: str
    limit: str
    after: str
    def __init__(self, account: _Optional[str] = ..., limit: _Optional[str] = ..., after: _Optional[str] = ...) -> None: ...

class RequestRecord(_message.Message):
    __slots__ = ("id", "object", "created", "request_id", "key_id", "model", "route", "n", "size", "quality", "cost_micros", "quoted_micros", "latency_ms", "status", "account")
    ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    QUOTED_MICROS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    id: str
    object: str
    created: int
    request_id: str
    key_id: str
    model: str
    route: str
    n: int
    size: str
    quality: str
    cost_micros: int
    quoted_micros: int
    latency_ms: int
    status: str
    account: str
    def __init__(self, id: _Optional[str] = ..., object: _Optional[str] = ..., created: _Optional[int] = ..., request_id: _Optional[str] = ..., key_id: _Optional[str] = ..., model: _Optional[str] = ..., route: _Optional[str] = ..., n: _Optional[int] = ..., size: _Optional[str] = ..., quality: _Optional[str] = ..., cost_micros: _Optional[int] = ..., quoted_micros: _Optional[int] = ..., latency_ms: _Optional[int] = ..., status: _Optional[str] = ..., account: _Optional[str] = ...) -> None: ...

class RequestList(_message.Message):
    __slots__ = ("object", "data", "has_more", "first_id", "last_id")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    FIRST_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ID_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[RequestRecord]
    has_more: bool
    first_id: str
    last_id: str
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[RequestRecord, _Mapping]]] = ..., has_more: _Optional[bool] = ..., first_id: _Optional[str] = ..., last_id: _Optional[str] = ...) -> None: ...

class ListModelRoutesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Price(_message.Message):
    __slots__ = ("size", "quality", "micros")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    MICROS_FIELD_NUMBER: _ClassVar[int]
    size: str
    quality: str
    micros: int
    def __init__(self, size: _Optional[str] = ..., quality: _Optional[str] = ..., micros: _Optional[int] = ...) -> None: ...

class RouteInfo(_message.Message):
    __slots__ = ("provider", "kind", "upstream_model", "live", "breaker", "missing")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    provider: str
    kind: str
    upstream_model: str
    live: bool
    breaker: str
    missing: str
    def __init__(self, provider: _Optional[str] = ..., kind: _Optional[str] = ..., upstream_model: _Optional[str] = ..., live: _Optional[bool] = ..., breaker: _Optional[str] = ..., missing: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "prices", "routes", "family")
    ID_FIELD_NUMBER: _ClassVar[int]
    PRICES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    id: str
    prices: _containers.RepeatedCompositeFieldContainer[Price]
    routes: _containers.RepeatedCompositeFieldContainer[RouteInfo]
    family: str
    def __init__(self, id: _Optional[str] = ..., prices: _Optional[_Iterable[_Union[Price, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[RouteInfo, _Mapping]]] = ..., family: _Optional[str] = ...) -> None: ...

class ModelInfoList(_message.Message):
    __slots__ = ("object", "data")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
