"""The service's one upload parser (service/uploads.py) and its input checks (service/inputs.py).

Pure functions and a real InputLoader: every front and gRPC client reaches these
same lines, so the REST tests only need to show that the bytes arrive intact.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from aiohttp import web

from service.catalog import InputRules, load_catalog
from service.errors import InvalidBody, InvalidParameter, UploadTooLarge
from service.inputs import InputLoader, decode
from service.providers.download import SafeDownloader
from service.requests import EDIT, GenerationParams, validate
from service.uploads import parse_edit, parse_variation
from tests.upload_helpers import bomb, data_url, encode, mask, multipart, picture, png

CATALOG = load_catalog()
LOCAL = CATALOG.models["local"]


# --- parsing -------------------------------------------------------------------------


def test_multipart_fields_images_and_mask() -> None:
    first, second, hole = png(colour=(1, 2, 3)), png(colour=(4, 5, 6)), mask((64, 64), (0, 0, 9, 9))
    ctype, body = multipart(
        [
            ("prompt", "a red fox"),
            ("model", "local"),
            ("n", "2"),
            ("size", "256x256"),
            ("stream", "false"),
            ("output_compression", "50"),
            ("input_fidelity", "high"),
            ("image[]", ("a.png", first, "image/png")),
            ("image[]", ("b.png", second, "image/png")),
            ("mask", ("m.png", hole, "image/png")),
            ("style", "vivid"),  # not an edit parameter: ignored, as OpenAI does
        ]
    )
    upload = parse_edit(ctype, body)
    assert upload.params == GenerationParams(
        prompt="a red fox",
        model="local",
        n=2,
        size="256x256",
        output_compression=50,
        input_fidelity="high",
    )
    assert [(s.param, s.data) for s in upload.images] == [("image[]", first), ("image[]", second)]
    assert upload.mask is not None and upload.mask.data == hole
    assert upload.images_param == "image"


def test_image_field_names_and_text_bodies() -> None:
    ctype, body = multipart(
        [("image", ("x.png", b"1", "image/png")), ("image[0]", ("y", b"2", "x/y")), ("prompt", "é")]
    )
    upload = parse_edit(ctype, body)
    assert [s.data for s in upload.images] == [b"1", b"2"]
    assert upload.params.prompt == "é"


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", "two"), ("n", "1.5"), ("n", "99999999999"), ("stream", "maybe"), ("partial_images", "")],
)
def test_bad_form_values_name_the_field(field: str, value: str) -> None:
    ctype, body = multipart([("prompt", "p"), (field, value)])
    with pytest.raises(InvalidParameter) as raised:
        parse_edit(ctype, body)
    assert raised.value.param == field


@pytest.mark.parametrize(
    "mangle",
    [
        lambda body: body[: len(body) // 2],  # truncated in a part
        lambda body: body[: body.rindex(b"--imagegate")],  # no closing boundary
        lambda body: b"garbage" + body,
        lambda body: b"",
    ],
    ids=["truncated", "unterminated", "preamble-garbage", "empty"],
)
def test_malformed_multipart(mangle) -> None:  # type: ignore[no-untyped-def]
    ctype, body = multipart([("prompt", "p"), ("image", ("a.png", png(), "image/png"))])
    with pytest.raises(InvalidBody) as raised:
        parse_edit(ctype, mangle(body))
    assert raised.value.code == "invalid_multipart"


@pytest.mark.parametrize(
    "ctype",
    ["", "text/plain", "multipart/form-data", "application/x-www-form-urlencoded"],
)
def test_unreadable_content_types(ctype: str) -> None:
    with pytest.raises(InvalidBody) as raised:
        parse_edit(ctype, b"prompt=x")
    assert raised.value.code == "invalid_multipart"


def test_too_many_parts_and_long_fields() -> None:
    ctype, body = multipart([("x", "1")] * 65)
    with pytest.raises(InvalidBody):
        parse_edit(ctype, body)
    ctype, body = multipart([("prompt", "p" * (256 * 1024 + 1))])
    with pytest.raises(InvalidParameter) as raised:
        parse_edit(ctype, body)
    assert raised.value.param == "prompt"


def test_json_form_with_data_and_remote_urls() -> None:
    image, hole = png(), mask((64, 64), (0, 0, 5, 5))
    body = json.dumps(
        {
            "prompt": "p",
            "n": 3.0,
            "stream": False,
            "images": [{"image_url": data_url(image)}, {"image_url": "https://example.com/a.png"}],
            "mask": {"image_url": data_url(hole)},
            "unknown": {"deep": [1, 2]},
        }
    ).encode()
    upload = parse_edit("application/json; charset=utf-8", body)
    assert upload.params == GenerationParams(prompt="p", n=3)
    assert [(s.param, s.data, s.url) for s in upload.images] == [
        ("images[0]", image, None),
        ("images[1]", None, "https://example.com/a.png"),
    ]
    assert upload.mask is not None and upload.mask.data == hole
    assert upload.images_param == "images"


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt":',
        b"[1]",
        b'{"prompt":"p","n":"2"}',
        b'{"prompt":"p","n":1.5}',
        b'{"prompt":"p","n":2147483648}',
        b'{"prompt":1}',
        b'{"prompt":"p","stream":"yes"}',
        b'{"prompt":"p","images":{"image_url":"x"}}',
        b'{"prompt":"p","images":["data:image/png;base64,AAAA"]}',
        b'{"prompt":"p","x":NaN}',
        b'{"prompt":"\xff"}',
    ],
)
def test_json_form_refuses_what_generations_refuse(body: bytes) -> None:
    with pytest.raises(InvalidBody) as raised:
        parse_edit("application/json", body)
    assert raised.value.code == "invalid_json"


@pytest.mark.parametrize(
    "image",
    [
        {"file_id": "file-123"},
        {},
        {"image_url": "ftp://example.com/a.png"},
        {"image_url": "data:image/png,notbase64"},
        {"image_url": "data:image/png;base64,%%%"},
    ],
)
def test_json_form_bad_image_entries(image: dict[str, str]) -> None:
    body = json.dumps({"prompt": "p", "images": [image]}).encode()
    with pytest.raises(InvalidParameter) as raised:
        parse_edit("application/json", body)
    assert raised.value.param == "images[0]"


def test_variation_reads_only_its_fields_and_only_multipart() -> None:
    ctype, body = multipart(
        [("image", ("a.png", png(), "image/png")), ("n", "2"), ("prompt", "ignored")]
    )
    upload = parse_variation(ctype, body)
    assert upload.params == GenerationParams(n=2)
    assert upload.mask is None
    with pytest.raises(InvalidBody):
        parse_variation("application/json", b"{}")


# --- input images --------------------------------------------------------------------


def _upload(*images: bytes, hole: bytes | None = None, prompt: str = "p"):  # type: ignore[no-untyped-def]
    parts: list = [("prompt", prompt)]
    parts += [("image[]", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    if hole is not None:
        parts.append(("mask", ("m.png", hole, "image/png")))
    return parse_edit(*multipart(parts))


async def test_loader_reads_format_size_and_alpha_from_the_bytes() -> None:
    jpeg = encode(picture((40, 30), (9, 9, 9)), "JPEG")
    webp = encode(picture((20, 20), (9, 9, 9, 0), "RGBA"), "WEBP")
    hole = mask((40, 30), (0, 0, 4, 4))
    inputs = await InputLoader().load(_upload(jpeg, webp, hole=hole), LOCAL)
    assert [(i.format, i.width, i.height, i.has_alpha) for i in inputs.images] == [
        ("jpeg", 40, 30, False),
        ("webp", 20, 20, True),
    ]
    assert inputs.mask is not None and (inputs.mask.format, inputs.mask.has_alpha) == ("png", True)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"%PDF-1.7 this is not an image, whatever its name says", "not a valid"),
        (png()[:60], "not a valid"),  # truncated
        (encode(picture((8, 8), (1, 1, 1)), "GIF"), "not a valid"),  # a real image, not allowed
        (bomb(), "pixels"),
    ],
    ids=["pdf", "truncated", "gif", "bomb"],
)
async def test_loader_refuses_what_is_not_a_small_enough_image(data: bytes, why: str) -> None:
    with pytest.raises(InvalidParameter) as raised:
        await InputLoader().load(_upload(data), LOCAL)
    assert (raised.value.param, why in raised.value.message) == ("image", True)


def test_bomb_is_refused_by_its_header_before_decoding() -> None:
    # 100 MP decoded would be 100 MB; the check allocates nothing of the sort.
    import tracemalloc

    data = bomb()
    tracemalloc.start()
    try:
        with pytest.raises(InvalidParameter):
            decode(data, "image", 40_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


async def test_loader_count_size_and_model_rules() -> None:
    loader = InputLoader()
    with pytest.raises(InvalidParameter, match="Too many images: 17"):
        await loader.load(_upload(*[png()] * 17), LOCAL)
    with pytest.raises(InvalidParameter) as missing:
        await loader.load(_upload(), LOCAL)
    assert missing.value.missing
    small = replace(LOCAL, inputs=InputRules(max_bytes=100, formats=("png",), square=True))
    with pytest.raises(UploadTooLarge) as large:
        await loader.load(_upload(png()), small)
    assert large.value.param == "image"
    tiny = replace(small, inputs=replace(small.inputs, max_bytes=10**6))
    with pytest.raises(InvalidParameter, match="square"):
        await loader.load(_upload(png((64, 32))), tiny)
    with pytest.raises(InvalidParameter, match="takes PNG images, not JPEG"):
        await loader.load(_upload(encode(picture((8, 8), (1, 1, 1)), "JPEG")), tiny)


@pytest.mark.parametrize(
    ("hole", "why"),
    [
        (mask((32, 32), (0, 0, 1, 1)), "same size"),
        (png((64, 64)), "alpha channel"),
        (encode(picture((64, 64), (1, 1, 1, 0), "RGBA"), "WEBP"), "PNG"),
    ],
    ids=["size", "no-alpha", "webp"],
)
async def test_mask_rules(hole: bytes, why: str) -> None:
    with pytest.raises(InvalidParameter, match=why) as raised:
        await InputLoader().load(_upload(png((64, 64)), hole=hole), LOCAL)
    assert raised.value.param == "mask"


async def test_remote_urls_refused_unless_a_host_is_listed() -> None:
    image = png()
    app = web.Application()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/png")

    app.router.add_get("/a.png", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/a.png"
    body = json.dumps({"prompt": "p", "images": [{"image_url": url}]}).encode()
    try:
        with pytest.raises(InvalidParameter, match="does not fetch remote image URLs"):
            await InputLoader().load(parse_edit("application/json", body), LOCAL)
        elsewhere = SafeDownloader("image_url", ["images.example.com"])
        with pytest.raises(InvalidParameter, match="not allowed for downloads") as refused:
            await InputLoader(fetcher=elsewhere).load(parse_edit("application/json", body), LOCAL)
        assert refused.value.param == "images[0]"
        await elsewhere.aclose()
        listed = InputLoader(fetcher=SafeDownloader("image_url", ["127.0.0.1"]))
        inputs = await listed.load(parse_edit("application/json", body), LOCAL)
        assert inputs.images[0].data == image
        await listed.aclose()
    finally:
        await runner.cleanup()


def test_validate_edit_capabilities() -> None:
    params = GenerationParams(prompt="p", input_fidelity="low")
    assert validate(params, CATALOG, "local", operation=EDIT).input_fidelity == "low"
    with pytest.raises(InvalidParameter, match="Model 'dall-e-3' does not support image edits"):
        validate(params, CATALOG, "dall-e-3", operation=EDIT)
    with pytest.raises(InvalidParameter) as raised:
        validate(params, CATALOG, "gpt-image-1-mini", operation=EDIT)
    assert raised.value.param == "input_fidelity"


async def test_token_priced_quote_bounds_the_input_images() -> None:
    request = validate(GenerationParams(prompt="p", n=2), CATALOG, "gpt-image-1", operation=EDIT)
    text_only = request.quote
    image = await InputLoader().load(_upload(png()), CATALOG.models["gpt-image-1"])
    with_inputs = replace(request, inputs=image.images)
    # 2 calls at most, 6500 tokens per input image each, at 10 USD per 1M tokens.
    assert with_inputs.quote - text_only == -(-2 * 6500 * 10_000_000 // 1_000_000)
