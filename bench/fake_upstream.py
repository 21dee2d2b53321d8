"""A zero-latency upstream in OpenAI's images wire format, for the bench.

`POST /v1/images/generations` answers at once with n copies of a fixed PNG,
whatever the model: about 1 KB, or about 1.5 MB when the size asked is
1792x1024 (the large-payload case; every other size gets the small one). The
answers are encoded once at start, so the figures measure the gateway in front,
not this server. `GET /ping` is a
bare aiohttp handler: the load generator's ceiling against a Python server.

    python bench/fake_upstream.py PORT
"""

from __future__ import annotations

import base64
import io
import json
import random
import sys

from aiohttp import web
from PIL import Image

SMALL_SIDE = 16  # 16x16 noise: a PNG of about 1 KB
LARGE_SIDE = 700  # 700x700 noise: about 1.5 MB (noise does not compress)
LARGE_SIZE = "1792x1024"


def noise_png(side: int, seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def answers() -> dict[tuple[str, int], bytes]:
    """The response body for (size class, n), built once."""
    images = {"small": noise_png(SMALL_SIDE, 1), "large": noise_png(LARGE_SIDE, 2)}
    bodies: dict[tuple[str, int], bytes] = {}
    for name, png in images.items():
        item = {"b64_json": base64.b64encode(png).decode(), "revised_prompt": "bench"}
        for n in range(1, 11):
            body = {"created": 1767225600, "data": [item] * n, "usage": None}
            bodies[(name, n)] = json.dumps(body).encode()
    return bodies


def app() -> web.Application:
    bodies = answers()

    async def generations(request: web.Request) -> web.Response:
        asked = await request.json()
        size = "large" if asked.get("size") == LARGE_SIZE else "small"
        n = min(10, max(1, int(asked.get("n") or 1)))
        return web.Response(body=bodies[(size, n)], content_type="application/json")

    async def ping(request: web.Request) -> web.Response:
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    application = web.Application(client_max_size=1 << 20)
    application.router.add_post("/v1/images/generations", generations)
    application.router.add_get("/ping", ping)
    return application


if __name__ == "__main__":
    web.run_app(app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
