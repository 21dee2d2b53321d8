"""SplitJson with an array of images (Bedrock's `"images": ["<b64>", ...]`): the long
strings directly in decode_key's array are decoded on the way, and no others, whether
the array closes and another key's array follows, or it nests, or scalars sit between.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import pytest

from service.providers import json_split
from service.providers.json_split import Base64Value, SplitJson


class Image(str):
    """A string SplitJson must return decoded: a long string of the images array."""


def text(seed: int, size: int = 30) -> str:
    return base64.b64encode(bytes((seed + i) % 256 for i in range(size))).decode()


def want(value: Any) -> Any:
    """The document as SplitJson(b"images") must return it."""
    if isinstance(value, Image):
        try:
            return Base64Value(base64.b64decode(value, validate=True))
        except binascii.Error:
            return Base64Value(None)
    if isinstance(value, dict):
        return {key: want(item) for key, item in value.items()}
    if isinstance(value, list):
        return [want(item) for item in value]
    return value


def split(body: bytes, cuts: list[int]) -> Any:
    parser = SplitJson(b"images")
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        parser.feed(body[start:end])
    return parser.result()


DOCUMENTS: list[Any] = [
    # Nova Canvas and Titan.
    {"images": [Image(text(1)), Image(text(2))], "error": None},
    # The array closes, another key's array of long strings follows, then the key again.
    {"images": [Image(text(1)), "QUJD"], "other": [text(2), text(3)], "x": text(4)},
    {"images": [Image(text(1))], "seeds": [text(2)], "images2": [text(3)]},
    # Stability on Bedrock: arrays of scalars before, scalars between strings.
    {
        "seeds": [1],
        "finish_reasons": [None, "Filter reason: x"],
        "images": [Image(text(1)), None, 7, Image(text(2))],
    },
    # A short string equal to the key inside the array; the key's plain value.
    {"images": ["images", Image(text(1))], "b": {"images": Image(text(2))}},
    # Nested arrays and objects are not its strings; neither is what follows them.
    {"images": [[text(1)], {"a": text(2)}, text(3)]},
    [{"images": [Image(text(1))]}, [[text(2)]], {"images": [[text(3)]]}],
    # Not base64, or escaped.
    {"images": [Image(text(1)[:13] + "=" + text(1)[14:]), Image(text(2) + "A")]},
    {"images": [Image(text(5))], "z": ['a"b\\', text(6)]},
]


@pytest.mark.parametrize("slashes", [False, True])
@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_cut_decodes_the_strings_of_the_array_only(
    document: Any, slashes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(json_split, "LONG", 16)  # every image here is a long string
    dumped = json.dumps(document)
    # Some servers send every '/' as '\/': the same JSON, an escape inside the base64.
    body = (dumped.replace("/", "\\/") if slashes else dumped).encode()
    expected = want(document)
    for cut in range(len(body) + 1):
        assert split(body, [cut]) == expected, cut
    for cut in range(len(body) - 1):
        assert split(body, [cut, cut + 1, cut + 2]) == expected, cut


def test_whitespace_around_the_array_as_a_pretty_printer_sends_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(json_split, "LONG", 16)
    document = {"images": [Image(text(1)), Image(text(2))], "other": [text(3)]}
    body = json.dumps(document, indent=4).encode()
    assert split(body, [len(body) // 2]) == want(document)
