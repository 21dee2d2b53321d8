"""The protobuf wire format of an ImagesResponse, as both sides of the contract write
it by hand: the service splices image bytes between messages protobuf encodes
(service/servicer.py), and the REST front rebuilds a reply's skeleton without
parsing its images (gateway/images_wire.py). Hand-written, beside the generated code."""

from __future__ import annotations

from imagegate.v1 import images_pb2

VARINT, I64, LEN, I32 = 0, 1, 2, 5  # wire types
DATA = images_pb2.ImagesResponse.DESCRIPTOR.fields_by_name["data"].number
B64 = images_pb2.Image.DESCRIPTOR.fields_by_name["b64_json"].number
# The keys of ImagesResponse.data and Image.b64_json, both length-delimited.
DATA_KEY = bytes([DATA << 3 | LEN])
B64_KEY = bytes([B64 << 3 | LEN])


def varint(value: int) -> bytes:
    """`value` (not negative) as a base-128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
