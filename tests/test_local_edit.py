"""The local renderer's edits and variations: the mask is honoured pixel for pixel, outputs
are deterministic, and several inputs all show."""

from __future__ import annotations

import io
import random
from dataclasses import replace

import pytest
from PIL import Image, ImageChops

from service.catalog import load_catalog
from service.inputs import InputLoader
from service.providers.base import UpstreamCall
from service.providers.local import LocalProvider
from service.providers.local_edit import edit, variation
from service.requests import EDIT, VARIATION, validate
from service.uploads import parse_edit, parse_variation
from tests.upload_helpers import encode, mask, multipart, png

CATALOG = load_catalog()
SIZE = (256, 256)


def noise(size: tuple[int, int] = SIZE, seed: int = 1) -> bytes:
    """Every pixel different: a changed pixel cannot hide."""
    data = random.Random(seed).randbytes(size[0] * size[1] * 3)
    return encode(Image.frombytes("RGB", size, data), "PNG")


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def draw(images: list[bytes], hole: bytes | None = None, **options: object) -> Image.Image:
    settings: dict[str, object] = {
        "output_format": "png",
        "quality": "standard",
        "background": None,
        "compression": None,
    }
    settings.update(options)
    return decode(edit("a red kite over the sea", images, hole, *SIZE, **settings))  # type: ignore[arg-type]


def test_mask_opaque_areas_keep_the_input_exactly() -> None:
    source = noise()
    # The left half is transparent: the edit happens there, the right half stays.
    out = draw([source], mask(SIZE, (0, 0, 127, 255))).convert("RGB")
    original = decode(source).convert("RGB")
    right = (128, 0, 256, 256)
    assert ImageChops.difference(out.crop(right), original.crop(right)).getbbox() is None
    left = (0, 0, 128, 256)
    assert _changed(out.crop(left), original.crop(left)) > 0.95


def test_without_mask_the_whole_image_is_edited_and_the_input_shows() -> None:
    source = noise()
    out = draw([source]).convert("RGB")
    original = decode(source).convert("RGB")
    assert _changed(out, original) > 0.95
    # Blended, not replaced: closer to the input than an unrelated noise image is.
    other = decode(noise(seed=2)).convert("RGB")
    assert _distance(out, original) < _distance(other, original)


def _changed(a: Image.Image, b: Image.Image) -> float:
    """The fraction of pixels that differ."""
    hist = ImageChops.difference(a, b).convert("L").histogram()
    return 1 - hist[0] / sum(hist)


def _distance(a: Image.Image, b: Image.Image) -> float:
    hist = ImageChops.difference(a, b).convert("L").histogram()
    return sum(i * n for i, n in enumerate(hist)) / sum(hist)


def test_several_inputs_all_show() -> None:
    first = noise()
    second = encode(Image.new("RGB", (40, 40), (10, 250, 30)), "PNG")
    third = encode(Image.new("RGB", (40, 40), (250, 10, 200)), "PNG")
    keep_all = mask(SIZE, (250, 0, 255, 5))  # a tiny hole far from the thumbnails
    out = draw([first, second, third], keep_all).convert("RGB")
    side = round(SIZE[1] * 0.2)
    margin = side // 8
    y = SIZE[1] - margin - side // 2
    assert out.getpixel((margin + side // 2, y)) == (10, 250, 30)
    assert out.getpixel((2 * margin + side + side // 2, y)) == (250, 10, 200)


def test_edits_are_deterministic_and_vary_by_index() -> None:
    source = noise()
    options: dict[str, object] = {
        "output_format": "png",
        "quality": "standard",
        "background": None,
        "compression": None,
    }
    a = edit("p", [source], None, 64, 64, index=0, **options)  # type: ignore[arg-type]
    b = edit("p", [source], None, 64, 64, index=0, **options)  # type: ignore[arg-type]
    c = edit("p", [source], None, 64, 64, index=1, **options)  # type: ignore[arg-type]
    assert a == b != c


@pytest.mark.parametrize(("fmt", "mode"), [("png", "RGBA"), ("webp", "RGBA"), ("jpeg", "RGB")])
def test_transparent_background_keeps_the_inputs_alpha(fmt: str, mode: str) -> None:
    clear = encode(Image.new("RGBA", SIZE, (0, 0, 0, 0)), "PNG")
    out = draw([clear], background="transparent", output_format=fmt)
    assert (out.format, out.mode) == (fmt.upper(), mode)
    if mode == "RGBA":
        # The corner (no drawing, no caption, kept by the mask) stays transparent.
        kept = draw([clear], mask(SIZE, (100, 100, 150, 150)), background="transparent")
        assert kept.getpixel((0, 0))[3] == 0


def test_variations_are_deterministic_distinct_and_sized() -> None:
    source = noise((300, 200))
    a = variation(source, 128, 128, index=0)
    assert a == variation(source, 128, 128, index=0)
    outs = {variation(source, 128, 128, index=i) for i in range(4)}
    assert len(outs) == 4
    image = decode(a)
    assert (image.format, image.size) == ("PNG", (128, 128))


async def _call(operation: str, body: tuple[str, bytes], n: int = 2) -> UpstreamCall:
    upload = (parse_edit if operation == EDIT else parse_variation)(*body)
    request = validate(upload.params, CATALOG, "local", operation=operation)
    inputs = await InputLoader().load(upload, request.model, variation=operation == VARIATION)
    request = replace(request, inputs=inputs.images, mask=inputs.mask)
    return UpstreamCall(request, "local", n)


async def test_local_provider_edits_and_varies() -> None:
    provider = LocalProvider()
    try:
        source = png(SIZE)
        call = await _call(
            EDIT,
            multipart(
                [
                    ("prompt", "a red kite"),
                    ("size", "512x512"),
                    ("output_format", "webp"),
                    ("image", ("a.png", source, "image/png")),
                    ("mask", ("m.png", mask(SIZE, (0, 0, 9, 9)), "image/png")),
                ]
            ),
        )
        assert call.images[0].data == source and call.mask is not None
        result = await provider.edit(call)
        assert [decode(i.data).size for i in result.images] == [(512, 512)] * 2
        assert {i.content_type for i in result.images} == {"image/webp"}
        assert result.images[0].data != result.images[1].data
        assert result.images[0].revised_prompt and "a red kite" in result.images[0].revised_prompt
        varied = await provider.variation(
            await _call(VARIATION, multipart([("image", ("a.png", source, "image/png"))]), n=3)
        )
        assert len({i.data for i in varied.images}) == 3
        assert all(i.revised_prompt is None for i in varied.images)
    finally:
        await provider.aclose()
