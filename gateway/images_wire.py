"""Where a serialised ImagesResponse's images lie, found without parsing them.

protobuf's parser copies every bytes field it reads, and reading the field copies
it again: for four 1.5 MB images, 12 MB copied before any base64, each copy into
fresh memory that page-faults for milliseconds while holding the GIL. Walking the
wire format instead finds each image as a view of the reply's own bytes, and
leaves a skeleton: the reply with every b64_json emptied (still present, so it
prints its key), a few hundred bytes that protobuf parses as usual.
"""

from __future__ import annotations

from imagegate.wire import B64, B64_KEY, DATA, DATA_KEY, I32, I64, LEN, VARINT, varint

_EMPTY_B64 = B64_KEY + b"\0"


def split(raw: bytes) -> tuple[bytes, list[memoryview]]:
    """The skeleton, and the bytes of every Image's b64_json in order (Images without
    one have none): what parsing `raw` and reading each b64_json would give.

    Raises ValueError for bytes that are not protobuf's wire format.
    """
    view = memoryview(raw)
    skeleton = bytearray()
    images = []
    for number, wire, start, value, end in _fields(raw, 0, len(raw)):
        if number == DATA and wire == LEN:
            image, b64 = _image(raw, value, end)
            skeleton += DATA_KEY + varint(len(image)) + image
            if b64 is not None:
                images.append(view[b64[0] : b64[1]])
        else:
            skeleton += raw[start:end]  # small: every large field is an image
    return bytes(skeleton), images


def _image(raw: bytes, start: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
    """An Image's skeleton, and where its b64_json's bytes are."""
    skeleton = b""
    b64 = None
    for number, wire, field_start, value, field_end in _fields(raw, start, end):
        if number == B64 and wire == LEN:
            b64 = (value, field_end)  # a field repeated: the last wins, as when parsed
            skeleton += _EMPTY_B64
        else:
            skeleton += raw[field_start:field_end]
    return skeleton, b64


def _fields(raw: bytes, pos: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """(number, wire type, start, value start, end) of each field in raw[pos:end]."""
    fields = []
    while pos < end:
        start = pos
        key = raw[pos]
        if key < 0x80:  # field numbers under 16: one byte, as all of ours
            pos += 1
        else:
            key, pos = _read_varint(raw, pos, end)
        number, wire = key >> 3, key & 7
        value = pos
        if wire == LEN:
            if pos < end and raw[pos] < 0x80:
                length, value = raw[pos], pos + 1
            else:
                length, value = _read_varint(raw, pos, end)
            pos = value + length
        elif wire == VARINT:
            _, pos = _read_varint(raw, pos, end)
        elif wire == I64:
            pos += 8
        elif wire == I32:
            pos += 4
        else:  # groups: none in ImagesResponse
            raise ValueError(f"wire type {wire} at byte {start}")
        if number == 0 or pos > end:
            raise ValueError(f"malformed field at byte {start}")
        fields.append((number, wire, start, value, pos))
    return fields


def _read_varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 64:
        byte = raw[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ValueError(f"malformed varint before byte {pos}")
