"""Large OpenAI-wire replies, read as they arrive (service/providers/json_split.py).

Replies over 64 KiB are parsed chunk by chunk, their `b64_json` values decoded on the
way; whatever the pieces they come in, the adapter must read them as json.loads and
b64decode(validate=True) would, and refuse them with the same errors. The fake writes
each piece on its own (no Content-Length); the split tests cut a document everywhere.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from service.errors import ContentPolicy, UpstreamError
from service.providers import json_split, openai
from service.providers.base import (
    AdapterDeps,
    CompletedImage,
    ProviderSettings,
    StreamingProvider,
)
from service.providers.download import SafeDownloader
from service.providers.json_split import Base64Value, SplitJson, read_reply
from tests.fakes.base import image_bytes
from tests.fakes.openai import OPENAI_KEY, FakeOpenAI, image_call
from tests.large_replies import b64, large_image


def reply_body(images: list[bytes], *, slashes: bool = False, **fields: Any) -> bytes:
    items = [{"b64_json": b64(img), "revised_prompt": f"prompt {i} \u706f\u53f0"} for i, img in
             enumerate(images)]  # fmt: skip
    usage = {"input_tokens": 10, "output_tokens": 99, "input_tokens_details": {"text_tokens": 10}}
    text = json.dumps({"created": 1, "data": items, "usage": usage, **fields})
    # PHP's json_encode, and others, send every '/' as '\/'.
    return (text.replace("/", "\\/") if slashes else text).encode()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(compatible_models={"flux"})
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def deps() -> AsyncIterator[AdapterDeps]:
    async with aiohttp.ClientSession() as http:
        downloader = SafeDownloader("oai", ["127.0.0.1"], max_bytes=1 << 20, timeout_s=5)
        yield AdapterDeps(http, downloader, {"OPENAI_API_KEY": OPENAI_KEY})
        await downloader.aclose()


def adapter(fake: FakeOpenAI, deps: AdapterDeps) -> StreamingProvider:
    settings = ProviderSettings(id="oai", kind="openai", base_url=fake.openai_base, timeout_s=5.0)
    provider = openai.create(settings, deps)
    assert isinstance(provider, StreamingProvider)
    return provider


@pytest.mark.parametrize("piece", [3, 4093, 1 << 16])
@pytest.mark.parametrize("slashes", [False, True])
async def test_large_reply_in_any_pieces_reads_as_whole(
    fake: FakeOpenAI, deps: AdapterDeps, piece: int, slashes: bool
) -> None:
    images = [large_image(150_000, 1), large_image(90_001, 2), large_image(120_002, 3)]
    fake.raw_reply, fake.raw_piece = reply_body(images, slashes=slashes), piece
    result = await adapter(fake, deps).generate(image_call("flux", n=3))
    assert [img.data for img in result.images] == images
    assert {img.content_type for img in result.images} == {"image/png"}
    assert [img.revised_prompt for img in result.images] == [
        f"prompt {i} \u706f\u53f0" for i in range(3)
    ]
    assert (result.usage.input_text_tokens, result.usage.output_tokens) == (10, 99)


async def test_extra_images_are_dropped_and_urls_fetched(
    fake: FakeOpenAI, deps: AdapterDeps
) -> None:
    hosted = image_bytes(seed=9)  # downloads are decoded to be checked
    body = json.loads(
        reply_body([large_image(100_000, 1), large_image(100_000, 2), large_image(100_000, 3)])
    )
    body["data"].insert(1, {"url": fake.host(hosted)})
    fake.raw_reply = json.dumps(body).encode()
    result = await adapter(fake, deps).generate(image_call("flux", n=2))
    assert [img.data for img in result.images] == [large_image(100_000, 1), hosted]


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        # Not base64: a character outside the alphabet, padding inside, a length 1 mod 4.
        (lambda s: s[:70_001] + "!" + s[70_002:], "not valid base64"),
        (lambda s: s[:80_000] + "==" + s[80_002:], "not valid base64"),
        (lambda s: s + "A", "not valid base64"),
        # An escaped character that is not base64 either; a raw control character is
        # not even JSON, whichever comes first.
        (lambda s: s[:90_000] + "\\n" + s[90_000:], "not valid base64"),
        (lambda s: s[:90_000] + "\n" + s[90_000:], "not JSON"),
    ],
)
async def test_a_large_image_that_is_not_base64(
    fake: FakeOpenAI, deps: AdapterDeps, mangle: Any, error: str
) -> None:
    text = b64(large_image(120_000, 1))
    body = reply_body([large_image(120_000, 1)]).decode().replace(text, mangle(text))
    fake.raw_reply, fake.raw_piece = body.encode(), 5000
    with pytest.raises(UpstreamError, match=error) as caught:
        await adapter(fake, deps).generate(image_call("flux"))
    assert not caught.value.retryable


@pytest.mark.parametrize("cut", [10, 100_000, -3, -1])
async def test_a_truncated_large_reply_is_not_json(
    fake: FakeOpenAI, deps: AdapterDeps, cut: int
) -> None:
    body = reply_body([large_image(120_000, 1)])
    fake.raw_reply, fake.raw_piece = body[:cut], 4096
    with pytest.raises(UpstreamError, match="sent a reply that is not JSON"):
        await adapter(fake, deps).generate(image_call("flux"))


async def test_large_error_with_http_200_is_a_refusal_and_scrubbed(
    fake: FakeOpenAI, deps: AdapterDeps
) -> None:
    error = {"message": f"blocked for {OPENAI_KEY}", "code": "content_policy_violation"}
    fake.raw_reply = json.dumps({"error": error, "padding": "x" * 200_000}).encode()
    with pytest.raises(ContentPolicy) as caught:
        await adapter(fake, deps).generate(image_call("flux"))
    assert OPENAI_KEY not in caught.value.message and "[redacted]" in caught.value.message
    # No data at all, or data that is not a list: as a small reply.
    fake.raw_reply = json.dumps({"created": 1, "note": "x" * 200_000}).encode()
    with pytest.raises(UpstreamError, match="without 'data'"):
        await adapter(fake, deps).generate(image_call("flux"))
    fake.raw_reply = json.dumps({"data": [], "note": "x" * 200_000}).encode()
    with pytest.raises(UpstreamError, match="no images"):
        await adapter(fake, deps).generate(image_call("flux"))


async def test_a_filtered_entry_beside_large_ones_is_a_safety_refusal(
    fake: FakeOpenAI, deps: AdapterDeps
) -> None:
    body = json.loads(reply_body([large_image(100_000, 1)]))
    body["data"].append({"content_filter_results": {"sexual": {"filtered": True}}})
    fake.raw_reply = json.dumps(body).encode()
    with pytest.raises(ContentPolicy):
        await adapter(fake, deps).generate(image_call("flux", n=2))


async def test_a_stream_answered_with_large_json_yields_its_images(
    fake: FakeOpenAI, deps: AdapterDeps
) -> None:
    images = [large_image(100_000, 1)]
    fake.raw_reply, fake.raw_piece = reply_body(images), 777
    call = image_call("gpt-image-1", quality="low", partial_images=1)
    got = [event async for event in adapter(fake, deps).stream(call)]
    assert fake.requests[-1].json["stream"] is True
    assert len(got) == 1 and isinstance(got[0], CompletedImage)
    assert got[0].image.data == images[0] and got[0].usage.output_tokens == 99


async def test_a_reply_over_the_limit_is_refused(fake: FakeOpenAI, deps: AdapterDeps) -> None:
    body = reply_body([large_image(100_000, 1)])
    fake.raw_reply = body
    headers = {"Authorization": f"Bearer {OPENAI_KEY}"}
    url = f"{fake.openai_base}/images/generations"
    async with deps.http.post(url, json={"model": "flux", "prompt": "p"}, headers=headers) as r:
        with pytest.raises(UpstreamError, match="sent a reply too large"):
            await read_reply(r, "oai", limit=len(body) - 1)
    async with deps.http.post(url, json={"model": "flux", "prompt": "p"}, headers=headers) as r:
        whole = await read_reply(r, "oai", limit=len(body))
        assert isinstance(whole, SplitJson)
        assert whole.result()["data"][0]["b64_json"] == Base64Value(large_image(100_000, 1))


# -- every cut, on a document small enough to try them all ------------------------------


def expected(body: bytes) -> object:
    """What the adapter must see: json.loads, b64_json decoded (None: not base64)."""
    try:
        document = json.loads(body)
    except ValueError:
        return "not JSON"
    for item in document.get("data", []):
        try:
            item["b64_json"] = Base64Value(base64.b64decode(item["b64_json"], validate=True))
        except ValueError:
            item["b64_json"] = Base64Value(None)
    return document


def split(body: bytes, cuts: list[int]) -> object:
    parser = SplitJson()
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        parser.feed(body[start:end])
    try:
        return parser.result()
    except ValueError:
        return "not JSON"


SMALL_DOCUMENTS = [
    # Escapes of every kind in and around a long base64 string, padding at its end.
    b'{"data": [{"b64_json": "AB\\/C\\u0044EFG+A==", "p": "\\"q\\" \\\\"}]}',
    b'{"data": [{"b64_json": "AB\\/C\\u0044EF\\\\/+A=="}]}',
    # UTF-8 of several bytes a character, in a long string beside the image.
    b'{"data": [{"b64_json": "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=", '
    b'"x": "\xe7\x81\xaf\xe5\x8f\xb0\xe7\x81\xaf\xe5\x8f\xb0"}]}',
    # Not base64 (padding inside, ending a quad or not), then not JSON (a raw newline),
    # then cut short.
    b'{"data": [{"b64_json": "QUJDREVG=0hJSktMTU5PUFFSU1RVVldYWVo="}]}',
    b'{"data": [{"b64_json": "QUJDREVGQQ==SElKS0xNTk9QUVJTVFVWV1hZWg=="}]}',
    b'{"data": [{"b64_json": "QUJDREVGR0hJSktM\nTU5PUFFSU1RVVldYWVo="}]}',
    b'{"data": [{"b64_json": "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=',
    b'{"data": [{"b64_json": "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="}]} trailing',
]


@pytest.mark.parametrize("body", SMALL_DOCUMENTS)
def test_every_cut_reads_as_the_whole(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_split, "LONG", 8)  # every value here is a long string
    want = expected(body)
    for cut in range(len(body) + 1):
        assert split(body, [cut]) == want, cut
    for cut in range(len(body) - 1):
        assert split(body, [cut, cut + 1, cut + 2]) == want, cut


def test_random_documents_and_cuts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_split, "LONG", 16)
    rng = random.Random(7)
    for _ in range(300):
        text = b64(rng.randbytes(rng.randint(20, 200)))
        if rng.random() < 0.3:
            spot = rng.randrange(len(text))
            text = text[:spot] + rng.choice(["=", "!", "\\", '"', "\u00e9", " "]) + text[spot:]
        dumped = json.dumps({"data": [{"b64_json": text, "p": "\u00e9\\/" * 20}]})
        if rng.random() < 0.5:
            dumped = dumped.replace("/", "\\/")
        body = dumped.encode()
        if rng.random() < 0.2:
            body = body[: rng.randrange(len(body))]
        cuts = sorted(rng.sample(range(len(body)), min(len(body), rng.randint(1, 20))))
        assert split(body, cuts) == expected(body), body
