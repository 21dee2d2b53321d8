"""The shared upstream-reply helpers: statuses as errors, Retry-After, scrubbing, image bytes."""

from __future__ import annotations

import base64
import email.utils

import pytest

from service.errors import UpstreamError
from service.providers.base import MissingCredentials
from service.providers.http import (
    MAX_MESSAGE_CHARS,
    MAX_RETRY_AFTER_S,
    credential,
    decode_image_b64,
    image_type,
    retry_after,
    scrub,
    status_error,
)
from tests.fakes.base import image_bytes


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(401, False), (402, False), (403, False), (408, True), (429, True), (500, True)],
)
def test_statuses_every_provider_shares(status: int, retryable: bool) -> None:
    err = status_error("p1", status, {"Retry-After": "7"})
    assert isinstance(err, UpstreamError)
    assert err.retryable is retryable
    assert "'p1'" in err.message
    if retryable:
        assert err.retry_after_s == 7.0


@pytest.mark.parametrize("status", [200, 400, 404, 422])
def test_other_statuses_are_left_to_the_adapter(status: int) -> None:
    assert status_error("p1", status, {}) is None


def test_retry_after_forms() -> None:
    assert retry_after(None) is None
    assert retry_after("garbage") is None
    assert retry_after("nan") is None
    assert retry_after("-5") == 0.0
    assert retry_after("1e9") == MAX_RETRY_AFTER_S
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after(date, now=1_000_000) == pytest.approx(30.0)


def test_scrub_removes_credentials_and_bounds_text() -> None:
    text = scrub(
        "Incorrect API key provided: sk-secret123.\n Try again " + "x" * 1000, ["sk-secret123"]
    )
    assert "sk-secret123" not in text and "[redacted]" in text and "\n" not in text
    assert len(text) == MAX_MESSAGE_CHARS


def test_credential_names_the_variable_never_a_value() -> None:
    assert credential({"K": " v "}, "K") == "v"
    with pytest.raises(MissingCredentials, match="K is not set"):
        credential({"K": ""}, "K")


@pytest.mark.parametrize(
    ("fmt", "ctype"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_images_are_typed_by_their_bytes(fmt: str, ctype: str) -> None:
    data = image_bytes(fmt)
    assert image_type(data, "p") == ctype
    assert decode_image_b64(base64.b64encode(data).decode(), "p") == (data, ctype)


@pytest.mark.parametrize(
    "value", ["", None, 5, "not base64!", base64.b64encode(b"<html>").decode()]
)
def test_bad_base64_images_are_upstream_errors(value: object) -> None:
    with pytest.raises(UpstreamError):
        decode_image_b64(value, "p")
