from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateImagesRequest(_message.Message):
    __slots__ = ("prompt", "model", "n", "size", "quality", "response_format", "style", "user", "background", "output_format", "output_compression", "moderation", "stream", "partial_images")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    MODERATION_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    model: str
    n: int
    size: str
    quality: str
    response_format: str
    style: str
    user: str
    background: str
    output_format: str
    output_compression: int
    moderation: str
    stream: bool
    partial_images: int
    def __init__(self, prompt: _Optional[str] = ..., model: _Optional[str] = ..., n: _Optional[int] = ..., size: _Optional[str] = ..., quality: _Optional[str] = ..., response_format: _Optional[str] = ..., style: _Optional[str] = ..., user: _Optional[str] = ..., background: _Optional[str] = ..., output_format: _Optional[str] = ..., output_compression: _Optional[int] = ..., moderation: _Optional[str] = ..., stream: _Optional[bool] = ..., partial_images: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("url", "b64_json", "revised_prompt")
    URL_FIELD_NUMBER: _ClassVar[int]
    B64_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISED_PROMPT_FIELD_NUMBER: _ClassVar[int]
    url: str
    b64_json: bytes
    revised_prompt: str
    def __init__(self, url: _Optional[str] = ..., b64_json: _Optional[bytes] = ..., revised_prompt: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "input_tokens_details", "output_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_DETAILS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., input_tokens: _Optional[int] = ..., input_tokens_details: _Optional[_Union[InputTokensDetails, _Mapping]] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class InputTokensDetails(_message.Message):
    __slots__ = ("text_tokens", "image_tokens")
    TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text_tokens: int
    image_tokens: int
    def __init__(self, text_tokens: _Optional[int] = ..., image_tokens: _Optional[int] = ...) -> None: ...

class ImagesResponse(_message.Message):
    __slots__ = ("created", "data", "usage", "background", "output_format", "quality", "size")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    created: int
    data: _containers.RepeatedCompositeFieldContainer[Image]
    usage: Usage
    background: str
    output_format: str
    quality: str
    size: str
    def __init__(self, created: _Optional[int] = ..., data: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., background: _Optional[str] = ..., output_format: _Optional[str] = ..., quality: _Optional[str] = ..., size: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Model(_message.Message):
    __slots__ = ("id", "object", "created", "owned_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    OWNED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    object: str
    created: int
    owned_by: str
    def __init__(self, id: _Optional[str] = ..., object: _Optional[str] = ..., created: _Optional[int] = ..., owned_by: _Optional[str] = ...) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("object", "data")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    object: str
    data: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, object: _Optional[str] = ..., data: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetImageRequest(_message.Message):
    __slots__ = ("image_id", "expires", "signature")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    expires: str
    signature: str
    def __init__(self, image_id: _Optional[str] = ..., expires: _Optional[str] = ..., signature: _Optional[str] = ...) -> None: ...

class ImageEvent(_message.Message):
    __slots__ = ("type", "b64_json", "partial_image_index", "background", "created_at", "output_format", "quality", "size", "usage", "error")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    B64_JSON_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    type: str
    b64_json: bytes
    partial_image_index: int
    background: str
    created_at: int
    output_format: str
    quality: str
    size: str
    usage: Usage
    error: _status_pb2.Status
    def __init__(self, type: _Optional[str] = ..., b64_json: _Optional[bytes] = ..., partial_image_index: _Optional[int] = ..., background: _Optional[str] = ..., created_at: _Optional[int] = ..., output_format: _Optional[str] = ..., quality: _Optional[str] = ..., size: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...
