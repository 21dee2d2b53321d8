"""Deterministic offline image rendering with Pillow: same inputs, byte-identical output."""

from __future__ import annotations

import colorsys
import hashlib
import os
import random
import tempfile
import unicodedata
import zlib
from collections.abc import Callable
from typing import BinaryIO

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
QUALITIES = ("standard", "hd")

# Pillow quality used when the caller sent no output_compression.
DEFAULT_LOSSY_QUALITY = 90
# Background and shapes are drawn at 1/SCALE resolution and upscaled, because
# drawing and blurring cost little at that size.
SCALE = 4
# Nothing is drawn within this fraction of the border, so corners stay background
# (and stay fully transparent with background='transparent').
MARGIN = 0.04
# Amplitude of the hd grain: enough entropy that a 1536x1024 PNG exceeds 1.5 MB.
GRAIN = 0.06
ELLIPSIS = "\u2026"
# More characters than six lines of the narrowest glyphs hold on the widest size.
CAPTION_CHARS = 600
# Narrowest glyph of the built-in font (the apostrophe, 0.17 em), rounded down.
NARROWEST = 0.15


def render(
    prompt: str,
    width: int,
    height: int,
    *,
    output_format: str,
    quality: str,
    background: str | None,
    compression: int | None,
    index: int = 0,
) -> bytes:
    """Draw the image for (prompt, size, index) and encode it; pure and thread-safe."""
    if output_format not in CONTENT_TYPES:
        raise ValueError(f"unknown output format {output_format!r}")
    if quality not in QUALITIES:
        raise ValueError(f"unknown quality {quality!r}")
    transparent = background == "transparent"
    if transparent and output_format == "jpeg":
        raise ValueError("a transparent background needs png or webp")
    image = picture(prompt, width, height, transparent=transparent, index=index)
    caption(image, prompt)
    if quality == "hd":
        image = grain(image, prompt, index)
    return encode(image, output_format, compression)


def picture(prompt: str, width: int, height: int, *, transparent: bool, index: int) -> Image.Image:
    """The drawing for (prompt, size, index) without its caption (edits paint it in)."""
    # Colours depend on the prompt only, so the n images of a request form a set;
    # the layout also depends on index, so they differ.
    palette = _palette(_digest("palette", prompt))
    layout = random.Random(_digest("layout", prompt, index))
    return _backdrop(width, height, palette, layout, transparent)


def grain(image: Image.Image, prompt: str, index: int) -> Image.Image:
    """The hd texture, deterministic for (prompt, size, index)."""
    width, height = image.size
    return _grain(image, _digest("grain", prompt, width, height, index))


def render_partial(
    prompt: str,
    width: int,
    height: int,
    *,
    output_format: str,
    background: str | None,
    compression: int | None,
    step: int,
    steps: int,
    index: int = 0,
) -> bytes:
    """Preview `step` of `steps` of what render() draws for the same inputs: its backdrop,
    without the caption, coarser the earlier the step (drawn small, blurred, upscaled)."""
    transparent = background == "transparent"
    palette = _palette(_digest("palette", prompt))
    layout = random.Random(_digest("layout", prompt, index))
    image = _backdrop(width, height, palette, layout, transparent)
    # The last preview is 1/4 of the size, each earlier one half of the next.
    factor = 2 ** (steps - step + 1)
    small = image.resize((max(1, width // factor), max(1, height // factor)), Image.Resampling.BOX)
    small = small.filter(ImageFilter.GaussianBlur(1.0))
    return encode(
        small.resize((width, height), Image.Resampling.BILINEAR), output_format, compression
    )


def encode(image: Image.Image, output_format: str, compression: int | None) -> bytes:
    """Encode with the settings render() uses (shared so benchmarks compare like for like)."""
    # Pillow's PNG and JPEG encoders hold the GIL when writing to a BytesIO but
    # release it when writing to a real file descriptor, so render threads only
    # run in parallel if they encode into a file.
    with _scratch_file() as out:
        if output_format == "png":
            # Z_RLE at level 1: smooth gradients still shrink well, and the incompressible
            # hd grain encodes in about half the time of the default level 6.
            image.save(out, "PNG", compress_level=1, compress_type=zlib.Z_RLE)
        else:
            # OpenAI's output_compression: higher means smaller files, i.e. lower quality.
            q = DEFAULT_LOSSY_QUALITY if compression is None else 100 - compression
            if output_format == "jpeg":
                image.save(out, "JPEG", quality=q)
            else:
                # method 2: files within a few % of the default 4's, in under half the time.
                image.save(out, "WEBP", quality=q, method=2)
        out.seek(0)
        return out.read()


def _scratch_file() -> BinaryIO:
    if hasattr(os, "memfd_create"):
        # Linux: an anonymous in-memory file; works on a read-only filesystem too.
        return open(os.memfd_create("imagegate-render"), "w+b")
    return tempfile.TemporaryFile()


def _digest(*parts: object) -> int:
    # SHA-256, not hash(): Python salts str hashes per process.
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest(), "big")


def _palette(seed: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    base = rng.random()
    # Three hues spread around the wheel from one base look harmonious.
    hues = [(base + offset) % 1.0 for offset in (0.0, 0.12 + rng.random() * 0.1, 0.5)]
    lights = (0.22, 0.5, 0.78)
    colours = []
    for hue, light in zip(hues, lights, strict=True):
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.55 + rng.random() * 0.3)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours


def _backdrop(
    width: int,
    height: int,
    palette: list[tuple[int, int, int]],
    rng: random.Random,
    transparent: bool,
) -> Image.Image:
    size = (max(16, width // SCALE), max(16, height // SCALE))
    if transparent:
        small = Image.new("RGBA", size, (0, 0, 0, 0))
    else:
        # Rotate the 256x256 ramp and keep its centre, which every angle fully covers.
        ramp = Image.linear_gradient("L").rotate(rng.uniform(0, 360), Image.Resampling.BILINEAR)
        ramp = ramp.crop((38, 38, 218, 218))
        dark, mid, light = palette
        small = ImageOps.colorize(ramp, dark, light, mid).resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(small, "RGBA")
    for _ in range(rng.randint(5, 8)):
        _shape(draw, size, palette, rng)
    # ImageDraw does not antialias; a slight blur before the upscale hides the
    # staircase edges. Premultiplied alpha keeps transparent edges from darkening.
    mode = small.mode
    small = small.convert("RGBa") if transparent else small
    small = small.filter(ImageFilter.GaussianBlur(1.0)).convert(mode)
    return small.resize((width, height), Image.Resampling.BILINEAR)


def _shape(
    draw: ImageDraw.ImageDraw,
    size: tuple[int, int],
    palette: list[tuple[int, int, int]],
    rng: random.Random,
) -> None:
    w, h = size
    r = rng.uniform(0.06, 0.2) * min(w, h)
    # Keep the whole shape inside the margins.
    cx = rng.uniform(MARGIN * w + r, (1 - MARGIN) * w - r)
    cy = rng.uniform(MARGIN * h + r, (1 - MARGIN) * h - r)
    red, green, blue = rng.choice(palette)
    shade = rng.uniform(0.6, 1.3)
    fill = (*(min(255, round(c * shade)) for c in (red, green, blue)), rng.randint(90, 190))
    box = (cx - r, cy - r, cx + r, cy + r)
    kind = rng.randrange(4)
    if kind == 0:
        draw.ellipse(box, fill=fill)
    elif kind == 1:
        draw.ellipse(box, outline=fill, width=max(1, round(r / 5)))
    elif kind == 2:
        draw.rounded_rectangle(box, radius=r / 3, fill=fill)
    else:
        sides, rotation = rng.randint(3, 6), rng.uniform(0, 360)
        draw.regular_polygon((cx, cy, r), sides, rotation=rotation, fill=fill)


def caption(image: Image.Image, prompt: str) -> None:
    """The prompt on a translucent panel in the middle of `image` (drawn in place)."""
    width, height = image.size
    font_size = max(11, min(width, height) // 16)
    font = ImageFont.load_default(size=font_size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        # Without FreeType Pillow falls back to a fixed-size bitmap font.
        raise RuntimeError("the local renderer needs Pillow built with FreeType")
    line_height = round(font_size * 1.3)
    pad = font_size // 2
    max_width = (1 - 4 * MARGIN) * width - 2 * pad
    max_lines = max(1, min(6, int(0.6 * height) // line_height))
    lines = _wrap(_printable(prompt), font, max_width, max_lines)
    text_width = max(font.getlength(line) for line in lines)
    box_w, box_h = text_width + 2 * pad, len(lines) * line_height + 2 * pad
    left, top = (width - box_w) / 2, (height - box_h) / 2
    draw = ImageDraw.Draw(image, "RGBA")
    # A translucent dark panel keeps white text legible on any palette.
    draw.rounded_rectangle(
        (left, top, left + box_w, top + box_h), radius=pad, fill=(12, 12, 20, 150)
    )
    for i, line in enumerate(lines):
        y = top + pad + i * line_height + line_height / 2
        draw.text((width / 2, y), line, font=font, fill=(255, 255, 255, 255), anchor="mm")


def _printable(prompt: str) -> str:
    # Only the start of a prompt fits on the image, and measuring all of a
    # 32,000-character prompt with the font would be slow.
    head = prompt[: 2 * CAPTION_CHARS]
    # The built-in font is ASCII-only; strip accents so "café" reads as "cafe".
    decomposed = unicodedata.normalize("NFKD", " ".join(head.split()))
    text = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    if len(text) > CAPTION_CHARS or len(prompt) > len(head):
        text = text[:CAPTION_CHARS].rstrip() + ELLIPSIS
    return text


def _wrap(text: str, font: ImageFont.FreeTypeFont, max_width: float, max_lines: int) -> list[str]:
    # No glyph is narrower than NARROWEST em, so longer strings need not be
    # measured: measuring long strings is what makes wrapping slow.
    limit = int(max_width / (NARROWEST * font.size)) + 1

    def fits(line: str) -> bool:
        return len(line) <= limit and font.getlength(line) <= max_width

    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        # A word wider than a line is broken wherever it overflows.
        while not fits(word) and len(lines) < max_lines:
            cut = _fit(word[:limit], fits)
            lines.append(word[:cut])
            word = word[cut:]
        current = word
        if len(lines) >= max_lines:
            # Text is left over: the last line shows it was cut.
            return _ellipsize(lines[:max_lines], font, max_width)
    lines.append(current)
    return lines


def _fit(word: str, fits: Callable[[str], bool]) -> int:
    # Longest prefix that fits, at least one character so wrapping always advances.
    lo, hi = 1, len(word)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(word[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _ellipsize(lines: list[str], font: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    last = lines[-1]
    while last and font.getlength(last + ELLIPSIS) > max_width:
        last = last[:-1]
    lines[-1] = last.rstrip() + ELLIPSIS
    return lines


def _grain(image: Image.Image, seed: int) -> Image.Image:
    width, height = image.size
    # One grey noise plane shared by the colour channels: a third of the random
    # bytes of per-channel noise, and still incompressible enough for big files.
    noise = Image.frombytes("L", (width, height), random.Random(seed).randbytes(width * height))
    planes = [noise, noise, noise]
    if image.mode == "RGBA":
        # Blending the alpha plane with itself leaves transparency untouched.
        planes.append(image.getchannel("A"))
    return Image.blend(image, Image.merge(image.mode, planes), GRAIN)
