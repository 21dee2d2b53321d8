"""The offline renderer and LocalProvider: formats, sizes, determinism, transparency, file sizes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.catalog import load_catalog
from service.providers.base import UpstreamCall
from service.providers.local import LocalProvider
from service.providers.local_render import CONTENT_TYPES, render
from service.requests import GenerationParams, ImageRequest, validate

ROOT = Path(__file__).resolve().parents[1]
CATALOG = load_catalog()
LOCAL = CATALOG.get("local")
assert LOCAL is not None
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
PROMPT = "A watercolor fox curled up in fresh snow at dusk"


def draw(
    prompt: str = PROMPT,
    size: str = "512x512",
    *,
    output_format: str = "png",
    quality: str = "standard",
    background: str | None = None,
    compression: int | None = None,
    index: int = 0,
) -> bytes:
    width, height = (int(v) for v in size.split("x"))
    return render(
        prompt,
        width,
        height,
        output_format=output_format,
        quality=quality,
        background=background,
        compression=compression,
        index=index,
    )


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def request(**params: Any) -> ImageRequest:
    return validate(GenerationParams(**params), CATALOG, "local")


def test_catalog_formats_match_the_renderer() -> None:
    assert set(LOCAL.output_formats) == set(CONTENT_TYPES)


@pytest.mark.parametrize("output_format", LOCAL.output_formats)
@pytest.mark.parametrize("size", LOCAL.sizes)
def test_every_catalog_size_and_format_decodes_to_that_size(size: str, output_format: str) -> None:
    image = decode(draw(size=size, output_format=output_format))
    assert image.format == PIL_FORMATS[output_format]
    assert f"{image.width}x{image.height}" == size
    assert image.mode == "RGB"
    assert Image.MIME[image.format] == CONTENT_TYPES[output_format]


def test_same_inputs_give_identical_bytes() -> None:
    for output_format in LOCAL.output_formats:
        assert draw(output_format=output_format) == draw(output_format=output_format)
    assert draw(quality="hd") == draw(quality="hd")


def test_output_does_not_depend_on_the_process_hash_seed() -> None:
    # Python salts str hashes per process; a fresh interpreter with another seed
    # must still produce the very same bytes.
    script = (
        "import hashlib; from service.providers.local_render import render; "
        f"print(hashlib.sha256(render({PROMPT!r}, 256, 256, output_format='png', "
        "quality='hd', background=None, compression=None, index=1)).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    here = hashlib.sha256(draw(size="256x256", quality="hd", index=1)).hexdigest()
    assert digests == {here}


def test_prompt_and_index_change_the_image() -> None:
    base = draw()
    assert draw(prompt=PROMPT + "!") != base
    assert draw(index=1) != base
    assert draw(index=2) != draw(index=1)


@pytest.mark.parametrize("output_format", ["png", "webp"])
@pytest.mark.parametrize("quality", ["standard", "hd"])
def test_transparent_background_has_transparent_corners(output_format: str, quality: str) -> None:
    image = decode(draw(output_format=output_format, quality=quality, background="transparent"))
    assert image.mode == "RGBA"
    w, h = image.size
    for corner in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)):
        assert image.getpixel(corner)[3] == 0
    # The caption's white text is fully opaque.
    assert image.getchannel("A").getextrema() == (0, 255)


@pytest.mark.parametrize("background", [None, "auto", "opaque"])
def test_other_backgrounds_are_opaque(background: str | None) -> None:
    assert decode(draw(background=background)).mode == "RGB"


@pytest.mark.parametrize("size", ["1792x1024", "1536x1024"])
def test_hd_wide_png_is_large_and_standard_is_small(size: str) -> None:
    hd = draw(size=size, quality="hd")
    standard = draw(size=size)
    assert len(hd) >= 1_500_000
    assert len(standard) < 500_000
    assert decode(hd).size == decode(standard).size


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_more_compression_gives_smaller_files(output_format: str) -> None:
    sizes = [len(draw(output_format=output_format, compression=c)) for c in (0, 50, 95)]
    assert sizes[0] > sizes[1] > sizes[2]
    # The most compression still yields a valid image.
    assert decode(draw(output_format=output_format, compression=100)).size == (512, 512)


@pytest.mark.parametrize(
    "prompt",
    [
        "x" * 32_000,
        "word " * 6_400,
        "Café au lait, 東京の夜, 🦊",
        "  spaced \n\t out  ",
    ],
)
def test_awkward_prompts_render(prompt: str) -> None:
    assert decode(draw(prompt=prompt, size="256x256")).size == (256, 256)


def test_impossible_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="transparent"):
        draw(output_format="jpeg", background="transparent")
    with pytest.raises(ValueError, match="format"):
        draw(output_format="gif")
    with pytest.raises(ValueError, match="quality"):
        draw(quality="ultra")


def call(req: ImageRequest) -> UpstreamCall:
    return UpstreamCall(req, req.model.upstream_model, req.n)


async def test_provider_returns_n_distinct_images_with_revised_prompt() -> None:
    req = request(
        prompt="  a fox\n in  snow ", n=3, size="256x256", output_format="webp", model="local"
    )
    provider = LocalProvider()
    try:
        result = await provider.generate(call(req))
    finally:
        await provider.aclose()
    assert (provider.id, provider.kind) == ("local", "local")
    assert len(result.images) == 3
    for i, image in enumerate(result.images):
        assert image.content_type == "image/webp"
        assert image.revised_prompt is not None
        assert image.revised_prompt.startswith("a fox in snow ")
        assert "offline" in image.revised_prompt
        # Image i is the renderer's index i, so a retry reproduces the same set.
        assert image.data == draw(prompt=req.prompt, size="256x256", output_format="webp", index=i)
    assert len({image.data for image in result.images}) == 3


async def test_provider_applies_request_options() -> None:
    req = request(prompt=PROMPT, size="1024x1536", quality="hd", background="transparent", n=1)
    provider = LocalProvider(max_workers=1)
    try:
        (image,) = (await provider.generate(call(req))).images
    finally:
        await provider.aclose()
    assert image.content_type == "image/png"
    decoded = decode(image.data)
    assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGBA", (1024, 1536))


async def test_provider_does_not_block_the_event_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    req = request(prompt=PROMPT, n=4, size="1792x1024", quality="hd")
    provider = LocalProvider()
    task = asyncio.create_task(ticker())
    try:
        result = await provider.generate(call(req))
    finally:
        task.cancel()
        await provider.aclose()
    assert len(result.images) == 4
    # Rendering four hd images takes several hundred ms; had it run on the loop
    # thread the ticker would not have run in between.
    assert ticks >= 3
