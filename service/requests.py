"""Generation requests: raw caller parameters, and their validation against the catalog."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.catalog import TOKENS_PER_PRICE_UNIT, Catalog, ModelSpec
from service.errors import InvalidParameter, ModelNotSupported

if TYPE_CHECKING:
    from service.inputs import InputImage

RESPONSE_FORMATS = ("url", "b64_json")
DEFAULT_OUTPUT_FORMAT = "png"
# Formats that can carry an alpha channel (OpenAI: transparent needs png or webp).
ALPHA_FORMATS = ("png", "webp")
# OpenAI's default quality, which clients send explicitly: the model's own default.
AUTO_QUALITY = "auto"
# What a request asks of the model (and which provider method serves it).
GENERATE, EDIT, VARIATION = "generate", "edit", "variation"
OPERATION_NAMES = {EDIT: "image edits", VARIATION: "image variations"}
# OpenAI's bound on preview images before a streamed image.
MAX_PARTIAL_IMAGES = 3


@dataclass(frozen=True)
class GenerationParams:
    """What the caller sent, before any defaults; None or "" means not sent."""

    prompt: str = ""
    model: str = ""
    n: int | None = None
    size: str = ""
    quality: str = ""
    response_format: str = ""
    style: str = ""
    user: str = ""
    background: str = ""
    output_format: str = ""
    output_compression: int | None = None
    moderation: str = ""
    stream: bool = False
    partial_images: int | None = None
    # Edits only.
    input_fidelity: str = ""


@dataclass(frozen=True)
class ImageRequest:
    """A validated request with every default applied: what a provider receives."""

    model: ModelSpec
    prompt: str
    n: int
    size: str
    quality: str
    response_format: str
    output_format: str
    style: str | None = None
    background: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    user: str = ""
    operation: str = GENERATE
    # Edits and variations: the checked input images (and the edit's mask).
    inputs: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
    input_fidelity: str | None = None
    # Streamed: the images are sent as events (always as image bytes, b64_json).
    stream: bool = False
    # Preview images a streamed single image gets first (0 when not streaming or n > 1).
    partial_images: int = 0

    @property
    def width(self) -> int:
        return int(self.size.split("x")[0])

    @property
    def height(self) -> int:
        return int(self.size.split("x")[1])

    @property
    def unit_price(self) -> int:
        price = self.model.unit_price(self.size, self.quality)
        assert price is not None, "validate() refuses unpriced requests"
        return price

    def prompt_bound_micros(self, calls: int) -> int:
        """Token-priced models: the most the prompt's input tokens cost over `calls` calls."""
        prices = self.model.token_prices
        return 0 if prices is None else prices.prompt_bound_micros(self.prompt, calls)

    def input_bound_micros(self, calls: int) -> int:
        """Token-priced models: the most the input (prompt and input images) costs over
        `calls` calls; each input image counts at most inputs.image_tokens_max tokens."""
        prices = self.model.token_prices
        if prices is None:
            return 0
        pictures = len(self.inputs) + (self.mask is not None)
        tokens = pictures * self.model.inputs.image_tokens_max * calls
        images = -(-tokens * prices.image_input // TOKENS_PER_PRICE_UNIT)
        return self.prompt_bound_micros(calls) + images

    @property
    def quote(self) -> int:
        """What is reserved: n * the per-image list price, plus for token-priced models
        the input's bound over the most upstream calls a request makes (one per image)."""
        return self.n * self.unit_price + self.input_bound_micros(self.n)


def validate(
    params: GenerationParams,
    catalog: Catalog,
    default_model: str,
    *,
    available: Sequence[str] = (),
    operation: str = GENERATE,
    streaming: bool = False,
) -> ImageRequest:
    """Apply the model's rules and defaults; raise InvalidParameter naming the field.

    `available` is what an unknown model's message may list: the caller's models
    only, never the whole catalog (a limited key must not learn the others).
    `operation` is edit or variation for those endpoints (the input images are
    checked afterwards, by service/inputs.py).
    `streaming`: the request is answered as a stream of events (the StreamImages
    RPC), whatever its `stream` field says; a unary call refuses `stream: true`.
    """
    model = _model(params.model or default_model, catalog, available)
    _operation(operation, model)
    # A variation has no prompt (the input image is all it follows).
    prompt = "" if operation == VARIATION else params.prompt
    if operation != VARIATION and not prompt.strip():
        raise InvalidParameter(
            "Missing required parameter: 'prompt'.", param="prompt", missing=True
        )
    if len(prompt) > model.prompt_max_chars:
        raise InvalidParameter(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{model.prompt_max_chars} for model '{model.id}', but got a string with length "
            f"{len(prompt)} instead.",
            param="prompt",
        )
    if params.stream and not streaming:
        raise InvalidParameter(
            "'stream': true is answered by the streaming RPC (StreamImages, StreamEditImages; "
            "the REST fronts route it there); this RPC returns one response.",
            param="stream",
        )
    partial_images = _partial_images(params.partial_images, streaming)
    n = 1 if params.n is None else params.n
    if not 1 <= n <= model.n_max:
        raise InvalidParameter(
            f"Invalid 'n': {n}. Model '{model.id}' makes between 1 and {model.n_max} "
            f"image{'s' if model.n_max > 1 else ''} per request.",
            param="n",
        )
    size = _choice("size", params.size or model.default_size, model.sizes, model)
    quality = _choice(
        "quality",
        model.default_quality if params.quality in ("", AUTO_QUALITY) else params.quality,
        model.qualities,
        model,
    )
    response_format = _response_format(params.response_format, streaming, model)
    style = _optional("style", params.style, model.styles, model)
    moderation = _optional("moderation", params.moderation, model.moderations, model)
    background = _optional("background", params.background, model.backgrounds, model)
    output_format = (
        _optional("output_format", params.output_format, model.output_formats, model)
        or DEFAULT_OUTPUT_FORMAT
    )
    if background == "transparent" and output_format not in ALPHA_FORMATS:
        raise InvalidParameter(
            "Transparent background requires output_format 'png' or 'webp'.",
            param="background",
        )
    compression = _compression(params.output_compression, output_format, model)
    fidelity = None
    if operation == EDIT:
        fidelity = _optional("input_fidelity", params.input_fidelity, model.input_fidelities, model)
    if model.unit_price(size, quality) is None:
        raise InvalidParameter(
            f"Model '{model.id}' has no price for size '{size}' at quality '{quality}'; "
            "choose another size or quality.",
            param="size",
        )
    return ImageRequest(
        model=model,
        prompt=prompt,
        n=n,
        size=size,
        quality=quality,
        response_format=response_format,
        output_format=output_format,
        style=style,
        background=background,
        output_compression=compression,
        moderation=moderation,
        user=params.user,
        operation=operation,
        input_fidelity=fidelity,
        stream=streaming,
        # Previews only for a single image: an event does not say which image it
        # previews, so n > 1 streams one completed event per image and no partials.
        partial_images=partial_images if n == 1 else 0,
    )


def _operation(operation: str, model: ModelSpec) -> None:
    able = {GENERATE: True, EDIT: model.edits, VARIATION: model.variations}[operation]
    if not able:
        raise InvalidParameter(
            f"Model '{model.id}' does not support {OPERATION_NAMES[operation]}.", param="model"
        )


def _partial_images(value: int | None, streaming: bool) -> int:
    if value is None:
        return 0
    if not streaming:
        raise InvalidParameter(
            "'partial_images' is only used with 'stream': true.", param="partial_images"
        )
    if not 0 <= value <= MAX_PARTIAL_IMAGES:
        raise InvalidParameter(
            f"Invalid 'partial_images': {value}. Expected an integer from 0 to "
            f"{MAX_PARTIAL_IMAGES}.",
            param="partial_images",
        )
    return value


def _response_format(value: str, streaming: bool, model: ModelSpec) -> str:
    if not streaming:
        return _choice("response_format", value or "url", RESPONSE_FORMATS, model)
    # Events carry the image itself (OpenAI's events have no url field).
    if value not in ("", "b64_json"):
        raise InvalidParameter(
            f"Invalid value for 'response_format': '{value}'. A streamed image is sent as "
            "b64_json in its event; leave response_format out or send 'b64_json'.",
            param="response_format",
        )
    return "b64_json"


def _model(model_id: str, catalog: Catalog, available: Sequence[str]) -> ModelSpec:
    model = catalog.get(model_id)
    if model is None:
        listed = f" Available models: {', '.join(available)}." if available else ""
        raise ModelNotSupported(
            f"The model '{model_id}' does not exist or is not an image model served here." + listed
        )
    return model


def _choice(param: str, value: str, allowed: tuple[str, ...], model: ModelSpec) -> str:
    if value not in allowed:
        raise InvalidParameter(
            f"Invalid value for '{param}': '{value}'. Model '{model.id}' supports: "
            f"{', '.join(repr(a) for a in allowed)}.",
            param=param,
        )
    return value


def _optional(param: str, value: str, allowed: tuple[str, ...], model: ModelSpec) -> str | None:
    if not value:
        return None
    if not allowed:
        raise InvalidParameter(f"'{param}' is not supported with model '{model.id}'.", param=param)
    return _choice(param, value, allowed, model)


def _compression(value: int | None, output_format: str, model: ModelSpec) -> int | None:
    if value is None:
        return None
    if not model.output_formats:
        raise InvalidParameter(
            f"'output_compression' is not supported with model '{model.id}'.",
            param="output_compression",
        )
    if output_format == "png":
        raise InvalidParameter(
            "'output_compression' applies to output_format 'jpeg' or 'webp', not 'png'.",
            param="output_compression",
        )
    if not 0 <= value <= 100:
        raise InvalidParameter(
            f"Invalid 'output_compression': {value}. Expected an integer from 0 to 100.",
            param="output_compression",
        )
    return value
