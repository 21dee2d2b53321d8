"""Input images and upload bodies for the edit and variation tests, built byte by byte."""

from __future__ import annotations

import base64
import io
import struct
import zlib

from PIL import Image, ImageDraw

BOUNDARY = "imagegate-test-boundary-7MA4YWxkTrZu0gW"
# (name, text) or (name, (filename, bytes, content type))
Part = tuple[str, str | tuple[str, bytes, str]]


def png(
    size: tuple[int, int] = (64, 64), colour: tuple[int, ...] = (200, 40, 40), mode: str = "RGB"
) -> bytes:
    """A real image with a pattern (so resizes and edits show), PNG-encoded."""
    return encode(picture(size, colour, mode), "PNG")


def picture(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, size, colour)
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((w // 4, h // 4, w // 2, h // 2), fill=(20, 20, 220) if mode != "L" else 30)
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def mask(size: tuple[int, int], hole: tuple[int, int, int, int]) -> bytes:
    """An RGBA PNG, opaque but for a fully transparent `hole` (where the edit happens)."""
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    ImageDraw.Draw(image).rectangle(hole, fill=(0, 0, 0, 0))
    return encode(image, "PNG")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def multipart(parts: list[Part], boundary: str = BOUNDARY) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/form-data upload, as OpenAI's SDKs send one."""
    out = io.BytesIO()
    for name, value in parts:
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, str):
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            out.write(value.encode())
        else:
            filename, data, ctype = value
            out.write(
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n".encode()
            )
            out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out.getvalue()


def bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid greyscale PNG of width x height black pixels: ~100 KB that decode to 100 MB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
