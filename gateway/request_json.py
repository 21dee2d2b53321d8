"""Request bodies: strict JSON to protobuf, refusing exactly what the Envoy front refuses."""

from __future__ import annotations

import functools
import json
import sys
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


class InvalidJson(ValueError):
    """The body is not a JSON object of this endpoint's fields."""


def parse_request(raw: bytes, message: M) -> M:
    """Strict JSON -> protobuf, refusing exactly what the Envoy front refuses.

    Unknown fields are ignored and an empty body is {}, as with Envoy's
    transcoder; like OpenAI (and Envoy's Lua filter) a known field must have
    its JSON type, so "n": "3" is refused although proto3 JSON would take it.
    """
    try:
        text = raw.decode("utf-8")
        if not text.strip(_JSON_SPACE):
            data: object = {}
        else:
            data = json.loads(
                text, parse_constant=_refuse, parse_float=_finite, parse_int=_finite_int
            )
        if not isinstance(data, dict) or _depth(data) > MAX_DEPTH:
            raise ValueError("not a JSON object, or nested too deeply")
        # Lone surrogates (\ud800) parse but cannot be UTF-8: refuse them.
        json.dumps(data, ensure_ascii=False).encode()
        kinds = _field_kinds(message.DESCRIPTOR)
        for name, value in data.items():
            kind = kinds.get(name)
            if kind is not None and value is not None and not _is_kind(value, kind):
                raise ValueError(f"wrong JSON type for {name}")
        json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except (ValueError, UnicodeError, json_format.ParseError, RecursionError) as exc:
        raise InvalidJson(str(exc)) from None
    return message


_JSON_SPACE = " \t\n\r\v\f"
# Nesting levels allowed, the root object counting as one (Envoy's transcoder limit).
MAX_DEPTH = 100
_KIND_OF_TYPE = {
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_INT32: int,
}


@functools.cache
def _field_kinds(descriptor: Descriptor) -> dict[str, type]:
    """JSON type of each scalar field, by proto name and JSON (camelCase) name."""
    return {
        name: _KIND_OF_TYPE[field.type]
        for field in descriptor.fields
        # Repeated and message fields: ParseDict checks those (so does the transcoder).
        if field.type in _KIND_OF_TYPE and not field.is_repeated
        for name in (field.name, field.json_name)
    }


def _is_kind(value: object, kind: type) -> bool:
    if kind is int:  # any JSON number; ParseDict then refuses fractions
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def _refuse(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _finite_int(text: str) -> int:
    value = int(text)
    if abs(value) > sys.float_info.max:  # Envoy reads every number as a double
        raise ValueError("number out of range")
    return value


def _depth(value: object) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest
