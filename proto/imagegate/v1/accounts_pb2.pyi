from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyLimits(_message.Message):
    __slots__ = ("rpm", "ipm", "concurrency", "max_n")
    RPM_FIELD_NUMBER: _ClassVar[int]
    IPM_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_N_FIELD_NUMBER: _ClassVar[int]
    rpm: int
    ipm: int
    concurrency: int
    max_n: int
    def __init__(self, rpm: _Optional[int] = ..., ipm: _Optional[int] = ..., concurrency: _Optional[int] = ..., max_n: _Optional[int] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("id", "prefix", "name", "account", "models", "limits", "created", "last_used", "revoked")
    ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    id: str
    prefix: str
    name: str
    account: str
    models: _containers.RepeatedScalarFieldContainer[str]
    limits: KeyLimits
    created: int
    last_used: int
    revoked: bool
    def __init__(self, id: _Optional[str] = ..., prefix: _Optional[str] = ..., name: _Optional[str] = ..., account: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ..., created: _Optional[int] = ..., last_used: _Optional[int] = ..., revoked: _Optional[bool] = ...) -> None: ...

class KeyList(_message.Message):
    __slots__ = ("object", "data")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ...) -> None: ...

class CreatedKey(_message.Message):
    __slots__ = ("key", "info")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    key: str
    info: KeyInfo
    def __init__(self, key: _Optional[str] = ..., info: _Optional[_Union[KeyInfo, _Mapping]] = ...) -> None: ...

class UsageBucket(_message.Message):
    __slots__ = ("day", "model", "key_id", "route", "requests", "images", "spend_micros")
    DAY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SPEND_MICROS_FIELD_NUMBER: _ClassVar[int]
    day: str
    model: str
    key_id: str
    route: str
    requests: int
    images: int
    spend_micros: int
    def __init__(self, day: _Optional[str] = ..., model: _Optional[str] = ..., key_id: _Optional[str] = ..., route: _Optional[str] = ..., requests: _Optional[int] = ..., images: _Optional[int] = ..., spend_micros: _Optional[int] = ...) -> None: ...

class UsageBucketList(_message.Message):
    __slots__ = ("object", "data")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[UsageBucket]
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[UsageBucket, _Mapping]]] = ...) -> None: ...
