"""Input images of edits and variations: fetched, sized, and decoded under a pixel cap.

What a file is comes from its bytes alone (Pillow identifies it by content, and
only PNG, JPEG and WebP decoders are tried), never from its part's filename or
declared type. Every image is decoded fully, in a thread, after its header's
dimensions have passed the pixel cap, so a decompression bomb is refused before
any pixel is allocated and a truncated file is refused before money is held.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from service.catalog import InputRules, ModelSpec
from service.errors import InvalidParameter, UploadTooLarge, UpstreamError
from service.uploads import ImageSource, Upload

# Larger than any image model takes (16 MP), small enough that a decoded image
# stays a bounded allocation (160 MB as RGBA at most).
DEFAULT_MAX_PIXELS = 40_000_000
# OpenAI's mask rule: a PNG under 4 MB.
MASK_MAX_BYTES = 4 * 1024 * 1024
# Pillow's format name -> ours (and the catalog's `inputs.formats`).
FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class InputImage:
    """A checked input image: its bytes as sent, and what decoding them showed."""

    data: bytes
    # "png", "jpeg" or "webp", from the bytes.
    format: str
    width: int
    height: int
    has_alpha: bool

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclass(frozen=True)
class Inputs:
    images: tuple[InputImage, ...]
    mask: InputImage | None = None


class Fetcher(Protocol):
    """service/providers/download.py's SafeDownloader, for images[].image_url."""

    async def fetch(self, url: str) -> tuple[bytes, str]: ...

    async def aclose(self) -> None: ...


class InputLoader:
    """Turns an upload's image sources into checked InputImages for one model."""

    def __init__(
        self,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        fetcher: Fetcher | None = None,
    ) -> None:
        self._max_pixels = max_pixels
        # None: remote image URLs are refused (no host is allowed).
        self._fetcher = fetcher

    async def load(self, upload: Upload, model: ModelSpec, *, variation: bool = False) -> Inputs:
        rules = model.inputs
        param = upload.images_param
        count = 1 if variation else rules.max_images
        if not upload.images:
            raise InvalidParameter(
                f"Missing required parameter: '{param}'.", param=param, missing=True
            )
        if len(upload.images) > count:
            raise InvalidParameter(
                f"Too many images: {len(upload.images)}. Model '{model.id}' takes at most "
                f"{count} input image{'s' if count > 1 else ''} here.",
                param=param,
            )
        sources = [*upload.images, *([upload.mask] if upload.mask is not None else [])]
        blobs = [await self._bytes(source) for source in sources]
        for source, data in zip(sources, blobs, strict=True):
            limit = MASK_MAX_BYTES if source is upload.mask else rules.max_bytes
            if len(data) > limit:
                raise UploadTooLarge(
                    f"The file in '{source.param}' is {len(data):,} bytes; model '{model.id}' "
                    f"takes files of at most {limit:,} bytes.",
                    param=_param(source, param),
                )
        checked = await asyncio.to_thread(self._decode_all, sources, blobs, param)
        images, mask = checked[: len(upload.images)], None
        if upload.mask is not None:
            mask = checked[-1]
        _check_rules(images, mask, rules, model.id, param)
        return Inputs(tuple(images), mask)

    async def aclose(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.aclose()

    async def _bytes(self, source: ImageSource) -> bytes:
        if source.data is not None:
            return source.data
        assert source.url is not None
        if self._fetcher is None:
            raise InvalidParameter(
                f"Invalid '{source.param}.image_url': this gateway does not fetch remote image "
                "URLs. Send the image as a data: URL (data:image/png;base64,...) or upload it "
                "as multipart/form-data.",
                param=source.param,
            )
        try:
            data, _ = await self._fetcher.fetch(source.url)
        except UpstreamError as exc:
            raise InvalidParameter(
                f"Invalid '{source.param}.image_url': the image could not be fetched: the URL "
                f"{_why(exc.message)}.",
                param=source.param,
            ) from None
        return data

    def _decode_all(
        self, sources: Sequence[ImageSource], blobs: Sequence[bytes], param: str
    ) -> list[InputImage]:
        return [
            decode(data, _param(source, param), self._max_pixels)
            for source, data in zip(sources, blobs, strict=True)
        ]


def decode(data: bytes, param: str, max_pixels: int) -> InputImage:
    """Identify by content, refuse above `max_pixels` before decoding, then decode fully."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb guard warns above its limit (our cap, below, refuses such an
            # image anyway, naming its size) and raises above twice it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=tuple(FORMATS)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise _too_many_pixels(param, width, height, max_pixels)
                fmt = FORMATS[str(image.format)]
                image.load()
                alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
                    "transparency" in image.info
                )
    except Image.DecompressionBombError:
        raise _too_many_pixels(param, 0, 0, max_pixels) from None
    except InvalidParameter:
        raise
    except Exception:
        raise InvalidParameter(
            f"Invalid '{param}': the file is not a valid PNG, JPEG or WebP image "
            "(checked by its content, not its name).",
            param=param,
        ) from None
    return InputImage(data, fmt, width, height, alpha)


def _too_many_pixels(param: str, width: int, height: int, max_pixels: int) -> InvalidParameter:
    size = f" is {width}x{height}" if width else " has too many pixels"
    return InvalidParameter(
        f"Invalid '{param}': the image{size}; at most {max_pixels:,} pixels are accepted.",
        param=param,
    )


def _check_rules(
    images: Sequence[InputImage],
    mask: InputImage | None,
    rules: InputRules,
    model_id: str,
    param: str,
) -> None:
    for image in images:
        if image.format not in rules.formats:
            allowed = ", ".join(f.upper() for f in rules.formats)
            raise InvalidParameter(
                f"Invalid '{param}': model '{model_id}' takes {allowed} images, not "
                f"{image.format.upper()}.",
                param=param,
            )
        if rules.square and image.width != image.height:
            raise InvalidParameter(
                f"Invalid '{param}': model '{model_id}' takes square images; this one is "
                f"{image.width}x{image.height}.",
                param=param,
            )
    if mask is None:
        return
    first = images[0]
    if mask.format != "png" or not mask.has_alpha:
        raise InvalidParameter(
            "Invalid 'mask': it must be a PNG with an alpha channel (its fully transparent "
            "areas are where the image is edited).",
            param="mask",
        )
    if (mask.width, mask.height) != (first.width, first.height):
        raise InvalidParameter(
            f"Invalid 'mask': it is {mask.width}x{mask.height} but the image is "
            f"{first.width}x{first.height}; they must be the same size.",
            param="mask",
        )


def _param(source: ImageSource, images_param: str) -> str:
    """Errors name the field as the API documents it: image / images / mask."""
    if source.param == "mask":
        return "mask"
    return images_param


def _why(message: str) -> str:
    # SafeDownloader's message is "An image URL returned by the upstream provider 'x' <why>."
    return message.rsplit("' ", 1)[-1].rstrip(".")
