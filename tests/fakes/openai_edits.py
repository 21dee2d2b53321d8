"""The fake OpenAI's edits and variations (multipart), checked the way OpenAI checks them.

Paths: OpenAI `POST /v1/images/edits` and `/v1/images/variations`; Azure
`POST /openai/deployments/{deployment}/images/edits?api-version=` and
`POST /openai/v1/images/edits`. Per family:
- gpt-image edits: files `image[]` (or `image`), 1-16 PNG/JPEG/WebP under 50 MB,
  optional PNG `mask`; `response_format` is a 400 `unknown_parameter`;
  `input_fidelity` high/low. usage reports IMAGE_TOKENS input tokens per
  uploaded picture (mask included). `stream=true` answers the generation
  stream's events typed image_edit.partial_image / image_edit.completed.
- dall-e-2 edits and variations: exactly one `image`, a square PNG under 4 MB
  (a mask of its size); variations are dall-e-2's alone.
Each upload is recorded (fields and files, in order) in `uploads`. The body is
parsed with the stdlib MIME parser, not the gateway's.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

from tests.fakes.base import Fault

MiB = 1024 * 1024
# Input tokens the fake reports per uploaded picture of a gpt-image edit.
IMAGE_TOKENS = 1000
MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}
EDIT_FIELDS = {
    "gpt-image": {
        "model",
        "prompt",
        "n",
        "size",
        "quality",
        "background",
        "output_format",
        "output_compression",
        "input_fidelity",
        "user",
        "stream",
        "partial_images",
    },
    "dall-e-2": {"model", "prompt", "n", "size", "response_format", "user"},
    "generic": {"model", "prompt", "n", "size", "response_format", "user"},
}
VARIATION_FIELDS = {"model", "n", "size", "response_format", "user"}


@dataclass
class FilePart:
    name: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class Upload:
    """One multipart request as it arrived: text fields and files, in order."""

    path: str
    fields: dict[str, str] = field(default_factory=dict)
    files: list[FilePart] = field(default_factory=list)

    def images(self) -> list[FilePart]:
        return [f for f in self.files if f.name in ("image", "image[]")]

    def mask(self) -> FilePart | None:
        return next((f for f in self.files if f.name == "mask"), None)


class EditEndpoints:
    """Mixed into FakeOpenAI: its auth, faults, deployments and replies are used here."""

    uploads: list[Upload]

    def edit_routes(self, app: web.Application) -> None:
        self.uploads = []
        app.router.add_post("/v1/images/edits", self._openai_edit)
        app.router.add_post("/v1/images/variations", self._openai_variation)
        app.router.add_post("/openai/deployments/{deployment}/images/edits", self._azure_edit)
        app.router.add_post("/openai/v1/images/edits", self._azure_v1_edit)

    async def _openai_edit(self, request: web.Request) -> web.StreamResponse:
        return await self._openai_upload(request, variation=False)

    async def _openai_variation(self, request: web.Request) -> web.StreamResponse:
        return await self._openai_upload(request, variation=True)

    async def _openai_upload(self, request: web.Request, *, variation: bool) -> web.StreamResponse:
        fake: Any = self
        fault = await fake.take_fault(request)
        denied = fake._openai_auth(request, fault)
        if denied is not None:
            return denied
        upload = await self._read(request)
        if isinstance(upload, web.Response):
            return upload
        model = upload.fields.get("model", "dall-e-2")
        family = _family(model, fake.compatible_models)
        if family is None:
            return _error(404, f"The model `{model}` does not exist.", code="model_not_found")
        return self._answer(upload, model, family, fault, azure=False, variation=variation)

    async def _azure_edit(self, request: web.Request) -> web.StreamResponse:
        fake: Any = self
        fault = await fake.take_fault(request)
        denied = fake._azure_auth(request, fault)
        if denied is not None:
            return denied
        if not request.query.get("api-version"):
            return web.json_response(
                {"error": {"code": "404", "message": "Resource not found"}}, status=404
            )
        model = fake.deployments.get(request.match_info["deployment"])
        upload = await self._read(request)
        if isinstance(upload, web.Response):
            return upload
        if model is None:
            return _deployment_not_found()
        family = _family(model, ()) or "generic"
        return self._answer(upload, model, family, fault, azure=True, variation=False)

    async def _azure_v1_edit(self, request: web.Request) -> web.StreamResponse:
        fake: Any = self
        fault = await fake.take_fault(request)
        denied = fake._azure_auth(request, fault)
        if denied is not None:
            return denied
        upload = await self._read(request)
        if isinstance(upload, web.Response):
            return upload
        model = fake.deployments.get(upload.fields.get("model", ""))
        if model is None:
            return _deployment_not_found()
        family = _family(model, ()) or "generic"
        return self._answer(upload, model, family, fault, azure=True, variation=False)

    async def _read(self, request: web.Request) -> Upload | web.Response:
        ctype = request.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            return _error(
                400,
                "Invalid Content-Type header (application/json), expected multipart/form-data.",
            )
        upload = _parse(request.path, ctype, await request.read())
        self.uploads.append(upload)
        return upload

    def _answer(
        self,
        upload: Upload,
        model: str,
        family: str,
        fault: Fault | None,
        *,
        azure: bool,
        variation: bool,
    ) -> web.Response:
        fake: Any = self
        invalid = _check(upload, family, variation)
        if invalid is not None:
            return invalid
        fields = upload.fields
        body: dict[str, Any] = {
            "model": model,
            "prompt": fields.get("prompt", "a variation"),
            "n": int(fields.get("n", "1")),
        }
        for name in ("size", "quality", "output_format", "background", "response_format"):
            if name in fields:
                body[name] = fields[name]
        streamed = family == "gpt-image" and fields.get("stream") == "true"
        # Faults answer as for generations (same error bodies); validation passed already.
        failed = fake._generate(
            {k: v for k, v in body.items() if k in ("model", "prompt", "n")},
            family,
            fault,
            azure=azure,
        )
        if failed is not None:
            return failed
        if streamed:
            body["partial_images"] = int(fields.get("partial_images", "0"))
            fmt = body.get("output_format", "png")
            return web.Response(
                body=_edit_events(fake._events(body, fmt)), content_type="text/event-stream"
            )
        reply = fake._reply(body, family, fault, azure=azure)
        if family != "gpt-image" or fake.usage_override is not None:
            return reply
        payload = json.loads(reply.body)
        pictures = len(upload.images()) + (upload.mask() is not None)
        usage = payload["usage"]
        usage["input_tokens_details"]["image_tokens"] = IMAGE_TOKENS * pictures
        usage["input_tokens"] += IMAGE_TOKENS * pictures
        usage["total_tokens"] += IMAGE_TOKENS * pictures
        return web.json_response(payload)


async def _edit_events(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The generation stream's events, typed as OpenAI types an edit's (image_edit.*)."""
    async for event in events:
        yield event.replace(b"image_generation.", b"image_edit.")


def _family(model: str, compatible: Any) -> str | None:
    if model.startswith("gpt-image"):
        return "gpt-image"
    if model in ("dall-e-2", "dall-e-3"):
        return model
    return "generic" if model in compatible else None


def _parse(path: str, ctype: str, body: bytes) -> Upload:
    head = f"Content-Type: {ctype}\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    upload = Upload(path)
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is None:
            upload.fields[str(name)] = data.decode()
        else:
            upload.files.append(FilePart(str(name), filename, part.get_content_type(), data))
    return upload


def _kind(data: bytes) -> str | None:
    for magic, kind in MAGIC.items():
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def _check(upload: Upload, family: str, variation: bool) -> web.Response | None:
    """OpenAI's refusals of a malformed edit or variation, in OpenAI's error shape."""
    if family == "dall-e-3" or (variation and family == "gpt-image"):
        return _error(400, "This model does not support this operation.", param="model")
    allowed = VARIATION_FIELDS if variation else EDIT_FIELDS[family]
    for name in upload.fields:
        if name not in allowed:
            return _error(
                400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
            )
    if not variation and not upload.fields.get("prompt"):
        return _error(
            400,
            "Missing required parameter: 'prompt'.",
            param="prompt",
            code="missing_required_parameter",
        )
    images = upload.images()
    for part in upload.files:
        if part.name not in ("image", "image[]", "mask") or (variation and part.name != "image"):
            return _error(
                400, f"Unknown parameter: '{part.name}'.", param=part.name, code="unknown_parameter"
            )
    if family == "gpt-image":
        if not 1 <= len(images) <= 16:
            return _error(400, "Provide between 1 and 16 images.", param="image")
        for part in images:
            if _kind(part.data) is None or len(part.data) >= 50 * MiB:
                return _error(400, "Invalid image file or mode for image.", param="image")
    else:
        if [p.name for p in images] != ["image"]:
            return _error(400, "dall-e-2 takes exactly one 'image'.", param="image")
        data = images[0].data
        if _kind(data) != "png" or len(data) >= 4 * MiB or len(set(_size(data))) != 1:
            return _error(
                400, "Uploaded image must be a PNG and less than 4 MB, and square.", param="image"
            )
    mask = upload.mask()
    if mask is not None and (
        _kind(mask.data) != "png" or _size(mask.data) != _size(images[0].data)
    ):
        return _error(400, "Invalid mask image: a PNG of the image's size.", param="mask")
    return None


def _error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return web.json_response({"error": error}, status=status)


def _deployment_not_found() -> web.Response:
    return web.json_response(
        {"error": {"code": "DeploymentNotFound", "message": "The API deployment does not exist."}},
        status=404,
    )
