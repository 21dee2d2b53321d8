"""Edit and variation bodies as clients send them (multipart/form-data, or JSON with
images[].image_url), read here once for every front: the REST fronts pass the raw body.

Nothing here trusts a part's declared name, filename or content type as to what
it holds: the files are only bytes, checked later by service/inputs.py. The
body itself is already bounded (the fronts' upload limit, or the gRPC message
limit); the parts are bounded here in number and, for text fields, in size.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import multipart

from service import b64
from service.errors import InvalidBody, InvalidParameter
from service.requests import GenerationParams

INVALID_MULTIPART = "invalid_multipart"
INVALID_JSON = "invalid_json"
# Far more than 16 images, a mask and every parameter: a body of thousands of tiny
# parts is refused rather than walked.
MAX_PARTS = 64
# A text field (the prompt is at most 32,000 characters, 4 bytes each in UTF-8).
MAX_FIELD_BYTES = 256 * 1024
# Nesting levels of the JSON form (as for generation bodies).
MAX_DEPTH = 100
# image, image[] (OpenAI's SDKs for a list), image[0] (some form encoders).
_IMAGE_FIELD = re.compile(r"^image(\[\d*\])?$")
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
JSON_MESSAGE = (
    "We could not parse the JSON body of your request. Send a JSON object with this "
    "endpoint's parameters and the header Content-Type: application/json."
)


@dataclass(frozen=True)
class ImageSource:
    """One input image as the caller gave it: uploaded (or data: URL) bytes, or a URL."""

    # How the caller named it, for messages: "image", "image[]", "images[1]", "mask".
    param: str
    data: bytes | None = None
    # A remote http(s) URL (JSON form), fetched only under the configured allowlist.
    url: str | None = None


@dataclass(frozen=True)
class Upload:
    params: GenerationParams
    images: list[ImageSource] = field(default_factory=list)
    mask: ImageSource | None = None
    # The name errors about the images use: "image" (multipart) or "images" (JSON).
    images_param: str = "image"


# The parameters each endpoint reads; others are ignored, as unknown JSON fields are.
EDIT_FIELDS = {
    "prompt": str,
    "model": str,
    "n": int,
    "size": str,
    "quality": str,
    "background": str,
    "input_fidelity": str,
    "output_format": str,
    "output_compression": int,
    "response_format": str,
    "stream": bool,
    "partial_images": int,
    "user": str,
}
VARIATION_FIELDS = {"model": str, "n": int, "size": str, "response_format": str, "user": str}


def parse_edit(content_type: str, body: bytes) -> Upload:
    """POST /v1/images/edits: multipart (image / image[], mask) or JSON (images[].image_url)."""
    media = _media_type(content_type)
    if media == "application/json":
        return _json_upload(body)
    if media != "multipart/form-data":
        raise InvalidBody(
            "Send the edit as multipart/form-data (fields and image files, as OpenAI's SDKs "
            "do) or as application/json with images[].image_url.",
            code=INVALID_MULTIPART,
        )
    return _multipart_upload(content_type, body, EDIT_FIELDS, mask=True)


def parse_variation(content_type: str, body: bytes) -> Upload:
    """POST /v1/images/variations: multipart with one `image` file."""
    if _media_type(content_type) != "multipart/form-data":
        raise InvalidBody(
            "Send the variation request as multipart/form-data with an image file.",
            code=INVALID_MULTIPART,
        )
    return _multipart_upload(content_type, body, VARIATION_FIELDS, mask=False)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


# --- multipart/form-data ------------------------------------------------------------


def _multipart_upload(
    content_type: str, body: bytes, fields: Mapping[str, type], *, mask: bool
) -> Upload:
    _, options = multipart.parse_options_header(content_type)
    boundary = options.get("boundary", "")
    if not boundary:
        raise _bad_multipart("the Content-Type header has no boundary")
    texts: dict[str, str] = {}
    images: list[ImageSource] = []
    mask_source: ImageSource | None = None
    try:
        for name, data in _parts(boundary, body):
            if _IMAGE_FIELD.match(name):
                images.append(ImageSource(name, data=data))
            elif mask and name == "mask":
                if mask_source is not None:
                    raise InvalidParameter("Send at most one 'mask'.", param="mask")
                mask_source = ImageSource("mask", data=data)
            elif name in fields:
                if len(data) > MAX_FIELD_BYTES:
                    raise InvalidParameter(f"The field '{name}' is too long.", param=name)
                texts[name] = _text(name, data)
    except multipart.MultipartError as exc:
        raise _bad_multipart(str(exc)) from None
    return Upload(_params(texts, fields, typed=False), images, mask_source)


def _parts(boundary: str, body: bytes) -> list[tuple[str, bytes]]:
    """(field name, bytes) of every part, in order; MultipartError if the body is not one."""
    parts: list[tuple[str, bytes]] = []
    chunks: list[bytes] = []
    name = ""
    with multipart.PushMultipartParser(
        boundary, content_length=len(body), max_segment_count=MAX_PARTS, strict=True
    ) as parser:
        for event in parser.parse(body):
            if isinstance(event, multipart.MultipartSegment):
                name, chunks = event.name or "", []
            elif event is None:
                parts.append((name, b"".join(chunks)))
            else:
                chunks.append(bytes(event))
        parser.close()
    return parts


def _text(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_multipart(f"the field '{name}' is not UTF-8 text") from None


def _bad_multipart(why: str) -> InvalidBody:
    return InvalidBody(
        f"We could not parse the multipart/form-data body of your request ({why}). "
        "Send the fields and image files as OpenAI's SDKs do.",
        code=INVALID_MULTIPART,
    )


# --- JSON (images[].image_url) ----------------------------------------------------------


def _json_upload(body: bytes) -> Upload:
    data = _json_object(body)
    images_value = data.get("images")
    if images_value is None:
        images: list[ImageSource] = []
    elif isinstance(images_value, list):
        images = [_json_image(f"images[{i}]", item) for i, item in enumerate(images_value)]
    else:
        raise InvalidBody(JSON_MESSAGE, code=INVALID_JSON)
    mask_value = data.get("mask")
    mask = None if mask_value is None else _json_image("mask", mask_value)
    return Upload(_params(data, EDIT_FIELDS, typed=True), images, mask, images_param="images")


def _json_object(body: bytes) -> dict[str, object]:
    """Strict JSON, as generation bodies: one object, no NaN, known fields of their type."""
    try:
        text = body.decode("utf-8")
        data = json.loads(text, parse_constant=_refuse) if text.strip() else {}
        if not isinstance(data, dict) or _depth(data) > MAX_DEPTH:
            raise ValueError("not a JSON object, or nested too deeply")
        json.dumps(data, ensure_ascii=False).encode()  # lone surrogates
    except (ValueError, UnicodeError, RecursionError):
        raise InvalidBody(JSON_MESSAGE, code=INVALID_JSON) from None
    for name, kind in EDIT_FIELDS.items():
        value = data.get(name)
        if value is not None and not _is_kind(value, kind):
            raise InvalidBody(JSON_MESSAGE, code=INVALID_JSON)
    return data


def _json_image(param: str, item: object) -> ImageSource:
    if not isinstance(item, dict):
        raise InvalidBody(JSON_MESSAGE, code=INVALID_JSON)
    url = item.get("image_url")
    if url is None and "file_id" in item:
        raise InvalidParameter(
            f"'{param}.file_id' is not supported by this gateway; send '{param}.image_url' "
            "(a data: URL, or an http(s) URL if the gateway allows its host).",
            param=param,
        )
    if not isinstance(url, str) or not url:
        raise InvalidParameter(f"Missing required parameter: '{param}.image_url'.", param=param)
    if url[:5].lower() == "data:":
        return ImageSource(param, data=_data_url(param, url))
    if url.split(":", 1)[0].lower() in ("http", "https"):
        return ImageSource(param, url=url)
    raise InvalidParameter(
        f"Invalid '{param}.image_url': expected a data: URL or an http(s) URL.", param=param
    )


def _data_url(param: str, url: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None or ";base64" not in match.group(2).lower():
        raise InvalidParameter(
            f"Invalid '{param}.image_url': a data: URL must be base64 (data:image/png;base64,...).",
            param=param,
        )
    try:
        return b64.decode(url[match.end() :])
    except (binascii.Error, ValueError):
        raise InvalidParameter(
            f"Invalid '{param}.image_url': the data: URL is not valid base64.", param=param
        ) from None


def _refuse(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


def _depth(value: object) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _is_kind(value: object, kind: type) -> bool:
    if kind is int:
        # Any JSON number that is an int32, as protobuf reads one (3.0 is 3; 1.5 is not).
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and -(2**31) <= value < 2**31
            and float(value).is_integer()
        )
    return isinstance(value, kind)


# --- parameters -----------------------------------------------------------------------


def _params(
    values: Mapping[str, object], fields: Mapping[str, type], *, typed: bool
) -> GenerationParams:
    """The endpoint's parameters, typed: form fields are text ("2", "true"), JSON ones are not."""
    read: dict[str, object] = {}
    for name, kind in fields.items():
        value = values.get(name)
        if value is None:
            continue
        if kind is int:
            read[name] = _integer(name, value)
        elif kind is bool:
            read[name] = _boolean(name, value) if not typed else value
        else:
            read[name] = value
    return GenerationParams(**read)  # type: ignore[arg-type]


def _integer(name: str, value: object) -> int:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2**31:
            return int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        if abs(value) < 2**31:
            return value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,10}\s*", value):
        number = int(value)
        if abs(number) < 2**31:
            return number
    raise InvalidParameter(f"Invalid '{name}': expected an integer.", param=name)


def _boolean(name: str, value: object) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0", ""):
        return False
    raise InvalidParameter(f"Invalid '{name}': expected true or false.", param=name)
