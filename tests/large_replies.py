"""What the tests of large replies share: large images, their base64 made invalid, and a
record of the images that were decoded as the reply arrived (json_split.Base64Value)."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable

import pytest

from service.providers import json_split

PNG = b"\x89PNG\r\n\x1a\n"
# Replies of such images are over INLINE_BYTES: read_reply splits them.
LARGE = 300_000

# Ways a large image's base64 is not base64: a character outside the alphabet, padding
# inside, a length 1 mod 4, a newline (which a fake's json.dumps sends escaped, "\\n").
NOT_BASE64: dict[str, Callable[[str], str]] = {
    "bad-char": lambda s: s[:70_001] + "!" + s[70_002:],
    "inner-padding": lambda s: s[:80_000] + "==" + s[80_002:],
    "length": lambda s: s + "A",
    "newline": lambda s: s[:90_000] + "\n" + s[90_000:],
}
# A small image's base64 that is not base64: the error the large ones must get.
SMALL_NOT_BASE64 = "iVBORw0KGgo!"


def large_image(size: int = LARGE, seed: int = 0) -> bytes:
    """Bytes typed as PNG by their magic, `size` long, random (base64 of every digit)."""
    return PNG + random.Random(seed).randbytes(size - len(PNG))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decoded_on_arrival(monkeypatch: pytest.MonkeyPatch) -> list[bytes | None]:
    """The images an adapter takes from Base64Value (decoded while the reply arrived;
    None: not base64), in order: a reply read whole would leave this empty."""
    seen: list[bytes | None] = []
    image = json_split.Base64Value.image

    def recorded(self: json_split.Base64Value, provider_id: str) -> tuple[bytes, str]:
        seen.append(self.data)
        return image(self, provider_id)

    monkeypatch.setattr(json_split.Base64Value, "image", recorded)
    return seen
