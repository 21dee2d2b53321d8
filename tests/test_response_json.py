"""The front's ImagesResponse JSON: written slice by slice from the reply's own bytes, it
must be exactly what printing the whole parsed message gives (Envoy's bytes; the
fronts' parity tests compare the two fronts themselves)."""

from __future__ import annotations

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from imagegate.v1 import images_pb2

from gateway import images_wire, json_text, response_json

SLICE = response_json._SLICE
# Around a base64 slice, around a multiple of 3, and past the inline limit.
SIZES = [0, 1, 2, 3, 4, 1000, SLICE - 1, SLICE, SLICE + 1, 2 * SLICE + 2, 200_001]
# Text that looks like the emptied field the skeleton is split on.
MARKLIKE = '"b64_json":"" <é> \u2028'


def _reply(sizes: list[int], *, url_image: bool = True) -> images_pb2.ImagesResponse:
    message = images_pb2.ImagesResponse(created=7, size="1024x1024", output_format="png")
    for i, size in enumerate(sizes):
        message.data.add(b64_json=bytes((i * 7 + j) % 256 for j in range(size)))
        message.data[-1].revised_prompt = MARKLIKE
    if url_image:
        message.data.add(url=f"http://x/{MARKLIKE}", revised_prompt=MARKLIKE)
    message.usage.total_tokens = 3
    message.usage.input_tokens_details.text_tokens = 1
    return message


class _Writer:
    def __init__(self) -> None:
        self.body = bytearray()

    async def write(self, chunk: bytes) -> None:
        self.body += chunk


async def _printed(raw: bytes) -> bytes:
    body = response_json.images_body(raw)
    if isinstance(body, bytes):
        return body
    writer = _Writer()
    await body.write(writer)  # type: ignore[arg-type]
    assert len(writer.body) == body.size
    return bytes(writer.body)


@pytest.mark.parametrize(
    "sizes",
    [[], [0], [5], [SLICE + 1], SIZES, [1_500_001] * 4],
    ids=["no-images", "empty", "small", "past-a-slice", "mixed", "four-large"],
)
async def test_body_is_the_whole_message_printed(sizes: list[int]) -> None:
    message = _reply(sizes)
    assert await _printed(message.SerializeToString()) == json_text.message_json(message)


async def test_empty_data_list() -> None:
    message = images_pb2.ImagesResponse(created=1)
    assert await _printed(message.SerializeToString()) == json_text.message_json(message)


async def test_small_replies_are_one_body_large_ones_streamed() -> None:
    small = _reply([1000]).SerializeToString()
    assert isinstance(response_json.images_body(small), bytes)
    large = _reply([response_json.INLINE_BYTES]).SerializeToString()
    assert isinstance(response_json.images_body(large), response_json.ImagesPayload)


async def test_served_with_its_content_length() -> None:
    message = _reply(SIZES)

    async def handler(request: web.Request) -> web.Response:
        body = response_json.images_body(message.SerializeToString())
        return web.Response(body=body, headers={"Content-Type": "application/json"})

    app = web.Application()
    app.router.add_get("/", handler)
    async with (
        TestServer(app) as server,
        ClientSession() as http,
        http.get(server.make_url("/")) as response,
    ):
        body = await response.read()
        assert response.headers["Content-Length"] == str(len(body))
    assert body == json_text.message_json(message)


def test_split_finds_views_of_the_reply() -> None:
    message = _reply([10, 0, 3])
    raw = message.SerializeToString()
    skeleton, images = images_wire.split(raw)
    assert [bytes(image) for image in images] == [item.b64_json for item in message.data[:3]]
    assert all(image.obj is raw for image in images)  # views, not copies
    parsed = images_pb2.ImagesResponse.FromString(skeleton)
    assert [item.HasField("b64_json") for item in parsed.data] == [True, True, True, False]
    assert all(item.b64_json == b"" for item in parsed.data)
    for item in message.data[:3]:
        item.b64_json = b""
    assert parsed == message


def test_split_reads_as_a_parser_does() -> None:
    # A field given twice: the last wins. Unknown fields are kept in the skeleton.
    image = images_pb2.Image(b64_json=b"first").SerializeToString()
    image += images_pb2.Image(b64_json=b"last", revised_prompt="p").SerializeToString()
    unknown = bytes([15 << 3 | 0, 1])  # field 15, varint 1
    raw = bytes([2 << 3 | 2, len(image + unknown)]) + image + unknown
    skeleton, images = images_wire.split(raw)
    parsed = images_pb2.ImagesResponse.FromString(raw)
    assert [bytes(view) for view in images] == [parsed.data[0].b64_json] == [b"last"]
    assert images_pb2.ImagesResponse.FromString(skeleton).data[0].revised_prompt == "p"
    assert unknown in skeleton


@pytest.mark.parametrize(
    "raw",
    [b"\x12\x05ab", b"\x12", b"\x80", b"\x0b", b"\x00\x01"],
    ids=["truncated", "no-length", "truncated-varint", "group", "field-zero"],
)
def test_split_refuses_what_is_not_the_wire_format(raw: bytes) -> None:
    with pytest.raises(ValueError):
        images_wire.split(raw)


_TEXT = st.text(max_size=40)
_IMAGE = st.builds(
    lambda url, data, revised: images_pb2.Image(url=url, b64_json=data, revised_prompt=revised),
    st.none() | _TEXT,
    # Lengths around the one-byte varint limit (127) and the inline limit.
    st.none() | st.binary(max_size=300) | st.sampled_from([b"x" * 127, b"y" * 128, b"z" * 70_000]),
    st.none() | _TEXT,
)


@given(
    images=st.lists(_IMAGE, max_size=5),
    created=st.integers(0, 2**32 - 1),
    size=st.none() | st.sampled_from(["256x256", "1024x1024"]),
    tokens=st.integers(0, 2**32 - 1),
)
@settings(max_examples=150, deadline=None)
def test_split_agrees_with_protobuf_on_any_reply(
    images: list[images_pb2.Image], created: int, size: str | None, tokens: int
) -> None:
    message = images_pb2.ImagesResponse(created=created, data=images, size=size)
    message.usage.total_tokens = tokens
    raw = message.SerializeToString()
    skeleton, views = images_wire.split(raw)
    assert [bytes(v) for v in views] == [i.b64_json for i in message.data if i.HasField("b64_json")]
    for item in message.data:
        if item.HasField("b64_json"):
            item.b64_json = b""
    assert images_pb2.ImagesResponse.FromString(skeleton) == message
