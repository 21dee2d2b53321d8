"""The official OpenAI Node SDK (npm `openai`, installed by this test's set-up with the
machine's node and npm) streams images through both fronts, in one node run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from service.errors import UpstreamError
from tests.conftest import Stack, balance, make_tenant
from tests.fakes.streaming import Scene, StreamingProvider
from tests.providers_harness import UNIT_PRICE, model, provider, provider_stack, route

NODE_DIR = Path(__file__).parent / "node"
PINNED = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["openai"]
CREDIT = 1_000_000
FAILED = "The upstream provider failed with HTTP 500"


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("node and npm are part of the CI machine, and missing")
        pytest.skip("node/npm not installed here (CI runs this test)")
    return node, npm


def _installed() -> str | None:
    manifest = NODE_DIR / "node_modules" / "openai" / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.exists() else None


@pytest.fixture(scope="module")
def node() -> str:
    """node, with the pinned SDK installed from the registry into tests/node/node_modules."""
    node, npm = _tools()
    if _installed() != PINNED:
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-package-lock", "--ignore-scripts"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=100,
        )
    assert _installed() == PINNED
    return node


@pytest.fixture(scope="module")
async def nstack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("node"),
        providers={"offline": provider("local"), "streamer": provider("openai_compatible")},
        models={
            "drawn": model(route("offline", "local"), family="local"),
            "streamed": model(route("streamer", "s")),
        },
        kind_modules={"openai_compatible": "tests.fakes.streaming"},
    ) as stack:
        yield stack


async def run_node(node: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        node,
        str(NODE_DIR / "stream_images.mjs"),
        json.dumps(jobs),
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()[-2000:]
    results: list[dict[str, Any]] = json.loads(out)
    return results


async def test_node_sdk_streams_previews_and_images_and_raises_on_an_error_event(
    node: str, nstack: Stack
) -> None:
    streamer = nstack.service.registry.providers["streamer"]
    assert isinstance(streamer, StreamingProvider)
    streamer.default_scene = Scene(partials=1, images=0, error=UpstreamError(FAILED))
    tenant = await make_tenant(nstack.service)
    good = {"model": "drawn", "prompt": "a fox", "size": "256x256", "stream": True}
    jobs = []
    for base_url in nstack.fronts.values():
        jobs += [
            {"base_url": base_url, "key": tenant.key, "body": {**good, "partial_images": 2}},
            {"base_url": base_url, "key": tenant.key, "body": {**good, "n": 2}},
            {
                "base_url": base_url,
                "key": tenant.key,
                "body": {**good, "model": "streamed", "partial_images": 1},
            },
            {"base_url": base_url, "key": "sk-wrong", "body": good},
        ]
    results = await run_node(node, jobs)
    for previews, several, failing, unauthorised in zip(*[iter(results)] * 4, strict=True):
        assert previews["error"] is None
        assert [(e["type"], e["partial_image_index"]) for e in previews["events"]] == [
            ("image_generation.partial_image", 0),
            ("image_generation.partial_image", 1),
            ("image_generation.completed", None),
        ]
        assert all(e["png"] and e["size"] == "256x256" for e in previews["events"])
        assert previews["events"][2]["usage"]["total_tokens"] == 0
        assert [e["type"] for e in several["events"]] == ["image_generation.completed"] * 2
        # An error event after the first: the SDK throws its APIError with our message.
        assert [e["type"] for e in failing["events"]] == ["image_generation.partial_image"]
        assert failing["error"]["is_api_error"] and FAILED in failing["error"]["message"]
        assert (failing["error"]["type"], failing["error"]["code"]) == (
            "upstream_error",
            "upstream_error",
        )
        # An error before the first: an ordinary error response.
        assert unauthorised["events"] == []
        assert (unauthorised["error"]["name"], unauthorised["error"]["status"]) == (
            "AuthenticationError",
            401,
        )
    fronts = len(nstack.fronts)
    assert await balance(nstack.service, tenant.account) == CREDIT - fronts * 3 * UNIT_PRICE
