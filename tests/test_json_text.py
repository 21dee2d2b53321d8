"""The front's JSON printer: orjson's output, escaped as protobuf's printer escapes."""

from __future__ import annotations

import json

import pytest

from gateway import json_text


def _reference(value: object) -> bytes:
    """What the front printed before orjson: json with ensure_ascii=False, then the table."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.translate(json_text._TABLE).encode()


@pytest.mark.parametrize("start", range(0, 0x110000, 0x8000))
def test_every_code_point_prints_as_before(start: int) -> None:
    points = [cp for cp in range(start, start + 0x8000) if not 0xD800 <= cp <= 0xDFFF]
    for i in range(0, len(points), 64):
        value = {"message": "".join(map(chr, points[i : i + 64])), "n": i, "x": [None, True]}
        assert json_text.dumps(value) == _reference(value)


def test_what_orjson_refuses_is_printed_by_json() -> None:
    assert json_text.dumps({"big": 2**70}) == b'{"big":1180591620717411303424}'
    assert json_text.dumps({"a": "<b>"}) == b'{"a":"\\u003cb\\u003e"}'
