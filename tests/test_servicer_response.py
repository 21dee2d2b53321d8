"""A Generation as the ImagesResponse every front prints: usage and the reported fields."""

from __future__ import annotations

import typing

import openai.types
import pytest
from imagegate.v1 import images_pb2

from service.core import Generation, ResultImage
from service.providers.base import TokenUsage
from service.servicer import REPORTABLE, _response, _response_parts


def _generation(usage: TokenUsage | None = None, **reported: str) -> Generation:
    return Generation(
        created=1_800_000_000,
        images=[ResultImage(data=b"png")],
        usage=usage or TokenUsage(),
        cost_micros=1000,
        **reported,  # type: ignore[arg-type]
    )


def test_usage_maps_to_both_vocabularies() -> None:
    usage = _response(
        _generation(usage=TokenUsage(input_text_tokens=5, input_image_tokens=3, output_tokens=100))
    ).usage
    # OpenAI's Images fields...
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (8, 100, 108)
    details = usage.input_tokens_details
    assert (details.text_tokens, details.image_tokens) == (5, 3)
    # ...and the ModelMax document's, the same counts under its names.
    assert (usage.prompt_tokens, usage.completion_tokens) == (8, 100)


def test_usage_details_are_set_even_when_zero() -> None:
    # A message field prints only when set: zero details must still reach the JSON.
    assert _response(_generation()).usage.HasField("input_tokens_details")


@pytest.mark.parametrize(
    ("generated", "reported"),
    [
        (
            {
                "background": "opaque",
                "output_format": "png",
                "quality": "high",
                "size": "1024x1024",
            },
            {
                "background": "opaque",
                "output_format": "png",
                "quality": "high",
                "size": "1024x1024",
            },
        ),
        (
            {
                "background": "transparent",
                "output_format": "webp",
                "quality": "standard",
                "size": "256x256",
            },
            {"background": "transparent", "output_format": "webp"},
        ),
        (
            {"quality": "hd", "size": "1792x1024", "output_format": "jpeg"},
            {"output_format": "jpeg"},
        ),
        (
            {"background": "auto", "output_format": "gif", "size": "1536x1024"},
            {"size": "1536x1024"},
        ),
        ({}, {}),
    ],
)
def test_reported_fields_hold_only_openai_values(
    generated: dict[str, str], reported: dict[str, str]
) -> None:
    response = _response(_generation(**generated))
    present = {name: getattr(response, name) for name in REPORTABLE if response.HasField(name)}
    assert present == reported


def _literals(annotation: object) -> set[str]:
    """Every Literal value inside a (possibly Optional/Union) annotation."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return {v for arg in typing.get_args(annotation) for v in _literals(arg)}


def test_reportable_values_are_in_the_sdk_enumerations() -> None:
    # Ours is the common part of the SDK releases' enumerations: every value we
    # report must be one the installed SDK's ImagesResponse declares.
    fields = openai.types.ImagesResponse.model_fields
    for name, values in REPORTABLE.items():
        assert values <= _literals(fields[name].annotation), name


@pytest.mark.parametrize("length", [0, 1, 127, 128, 16_383, 16_384, 2_097_152])
def test_the_encoded_reply_is_the_message_protobuf_would_send(length: int) -> None:
    # The servicer splices the images' bytes into upb's encoding of the rest.
    gen = Generation(
        created=1_800_000_000,
        images=[
            ResultImage(data=bytes(range(256)) * (length // 256) + b"x" * (length % 256)),
            ResultImage(url="https://example.test/i.png", revised_prompt=""),
            ResultImage(data=b"png", revised_prompt="a lighthouse \u706f\u53f0"),
        ],
        usage=TokenUsage(input_text_tokens=5, output_tokens=100),
        cost_micros=1000,
        quality="high",
    )
    encoded = b"".join(_response_parts(gen))
    assert images_pb2.ImagesResponse.FromString(encoded) == _response(gen)
    assert len(encoded) == _response(gen).ByteSize()
