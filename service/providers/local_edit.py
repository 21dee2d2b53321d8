"""Offline edits and variations with Pillow: same inputs, byte-identical output.

An edit lays the input images on the canvas (the first one fills it, the
others sit as thumbnails along its bottom edge), then paints the prompt's
drawing and caption where the edit happens: in the mask's transparent areas
when there is a mask (the opaque areas keep the input's pixels exactly), else
over the whole image, blended so the input still shows. A variation is the
input re-coloured, maybe mirrored and re-framed, deterministically from the
input's bytes and the variant's index.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Sequence

from PIL import Image, ImageFilter, ImageOps

from service.providers.local_render import caption, encode, grain, picture

# How much of the drawing shows over an unmasked input (input_fidelity high keeps more).
BLEND = {"high": 0.25, "low": 0.55}
DEFAULT_BLEND = 0.4
# Thumbnails of the second and later input images: this fraction of the height.
THUMB = 0.2
FILL = (255, 255, 255, 255)


def edit(
    prompt: str,
    images: Sequence[bytes],
    mask: bytes | None,
    width: int,
    height: int,
    *,
    output_format: str,
    quality: str,
    background: str | None,
    compression: int | None,
    fidelity: str | None = None,
    index: int = 0,
) -> bytes:
    """Draw the prompt over the inputs, honouring the mask; pure and thread-safe."""
    canvas = _compose(images, width, height)
    drawing = picture(prompt, width, height, transparent=False, index=index).convert("RGBA")
    if mask is None:
        out = Image.blend(canvas, drawing, BLEND.get(fidelity or "", DEFAULT_BLEND))
        caption(out, prompt)
    else:
        caption(drawing, prompt)
        # Opaque mask areas keep the input, transparent ones take the drawing
        # (composite takes its first image where the mask is 255).
        keep = _fit(_open(mask), width, height).getchannel("A")
        out = Image.composite(canvas, drawing, keep)
    if quality == "hd":
        out = grain(out, prompt, index)
    return encode(_finish(out, background, output_format), output_format, compression)


def variation(
    image: bytes,
    width: int,
    height: int,
    *,
    output_format: str = "png",
    compression: int | None = None,
    index: int = 0,
) -> bytes:
    """A variant of `image`: hue turned, maybe mirrored, re-framed; pure and thread-safe."""
    rng = random.Random(hashlib.sha256(image).digest() + index.to_bytes(4, "big"))
    source = _open(image)
    alpha = source.getchannel("A")
    hsv = source.convert("RGB").convert("HSV")
    hue, sat, val = hsv.split()
    turn = 24 + rng.randrange(208)  # never (almost) the same colours
    hue = hue.point(lambda h: (h + turn) % 256)
    out = Image.merge("HSV", (hue, sat, val)).convert("RGB").convert("RGBA")
    out.putalpha(alpha)
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    # Re-framed: a crop of 80-100% of the image, somewhere inside it.
    zoom = 0.8 + 0.2 * rng.random()
    centring = (rng.random(), rng.random())
    crop = ImageOps.fit(
        out,
        (max(1, round(out.width * zoom)), max(1, round(out.height * zoom))),
        Image.Resampling.BICUBIC,
        centering=centring,
    )
    out = _fit(crop, width, height)
    return encode(_finish(out, None, output_format), output_format, compression)


def preview(
    image: bytes,
    width: int,
    height: int,
    *,
    output_format: str,
    compression: int | None,
    step: int,
    steps: int,
) -> bytes:
    """Preview `step` of `steps` of an edit: the input, coarser the earlier the step
    (as the generated previews: drawn small, blurred, upscaled)."""
    canvas = _fit(_open(image), width, height)
    factor = 2 ** (steps - step + 1)
    small = canvas.resize((max(1, width // factor), max(1, height // factor)), Image.Resampling.BOX)
    small = small.filter(ImageFilter.GaussianBlur(1.0))
    out = small.resize((width, height), Image.Resampling.BILINEAR)
    return encode(_finish(out, None, output_format), output_format, compression)


def _open(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGBA")


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover the size, cropping the overflow evenly (the mask is fitted the same way)."""
    return ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC)


def _compose(images: Sequence[bytes], width: int, height: int) -> Image.Image:
    canvas = _fit(_open(images[0]), width, height)
    side = max(1, round(height * THUMB))
    margin = max(1, side // 8)
    for i, data in enumerate(images[1:]):
        thumb = _fit(_open(data), side, side)
        x = margin + i * (side + margin)
        if x + side > width:
            break  # more inputs than fit along the edge: the first ones show
        canvas.alpha_composite(thumb, (x, height - side - margin))
    return canvas


def _finish(image: Image.Image, background: str | None, output_format: str) -> Image.Image:
    """Keep the alpha only for a transparent background in a format that carries it."""
    if background == "transparent" and output_format != "jpeg":
        return image
    flat = Image.new("RGBA", image.size, FILL)
    flat.alpha_composite(image)
    return flat.convert("RGB")
