"""Adapter tests' inputs: a validated request for a minimal catalog model, and its call."""

from __future__ import annotations

from dataclasses import replace

from service.catalog import ModelSpec
from service.providers.base import UpstreamCall
from service.requests import ImageRequest

SIZES = ("1024x1024", "1792x1024", "1024x1792", "1536x1024", "1024x1536")


def model_spec(model_id: str = "test-model", **overrides: object) -> ModelSpec:
    spec = ModelSpec(
        id=model_id,
        provider="test",
        upstream_model=model_id,
        sizes=SIZES,
        default_size="1024x1024",
        qualities=("standard", "hd"),
        default_quality="standard",
        prices={(size, q): 40_000 for size in SIZES for q in ("standard", "hd")},
        n_max=10,
        output_formats=("png", "jpeg", "webp"),
    )
    return replace(spec, **overrides)  # type: ignore[arg-type]


def upstream_call(
    upstream_model: str,
    *,
    n: int = 1,
    prompt: str = "a lighthouse at dusk",
    size: str = "1024x1024",
    quality: str = "standard",
    output_format: str = "png",
    output_compression: int | None = None,
    model: ModelSpec | None = None,
) -> UpstreamCall:
    request = ImageRequest(
        model=model or model_spec(),
        prompt=prompt,
        n=n,
        size=size,
        quality=quality,
        response_format="b64_json",
        output_format=output_format,
        output_compression=output_compression,
    )
    return UpstreamCall(request, upstream_model, n, request_id="req-test-1")
