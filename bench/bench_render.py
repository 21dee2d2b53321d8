"""Time local_render.render() against plain Pillow encoding, and LocalProvider's pool speedup."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

# Runnable from a checkout without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.catalog import load_catalog
from service.providers.local import LocalProvider
from service.providers.local_render import encode, render
from service.requests import GenerationParams, ImageRequest, validate

PROMPT = "A watercolor fox curled up in fresh snow at dusk, soft evening light"
# (label, width, height, output_format, quality)
CASES = [
    ("1024x1024 png standard", 1024, 1024, "png", "standard"),
    ("1792x1024 png hd", 1792, 1024, "png", "hd"),
    ("1024x1024 jpeg standard", 1024, 1024, "jpeg", "standard"),
]
BUDGET_S = 1.0  # per measurement; keeps the whole run to a few seconds
MAX_RUNS = 50


def median_ms(fn: Callable[[int], object], budget_s: float = BUDGET_S) -> float:
    """Median wall time of fn(i) in ms, after one warm-up, within a time budget."""
    fn(-1)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < MAX_RUNS):
        start = time.perf_counter()
        fn(len(samples))
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def bench_case(label: str, width: int, height: int, fmt: str, quality: str) -> None:
    def one(i: int) -> bytes:
        # A different index each run, as the n images of one request have.
        return render(
            PROMPT,
            width,
            height,
            output_format=fmt,
            quality=quality,
            background=None,
            compression=None,
            index=max(i, 0),
        )

    # The floor: the same encoder and settings on an image with nothing drawn.
    solid = Image.new("RGB", (width, height), (90, 140, 200))
    rendered = median_ms(one)
    baseline = median_ms(lambda _i: encode(solid, fmt, None), BUDGET_S / 3)
    size_mb = len(one(0)) / 1e6
    print(
        f"{label:<26}{rendered:>10.1f}{baseline:>13.1f}"
        f"{rendered / baseline:>7.1f}x{size_mb:>8.2f} MB"
    )


def bench_render() -> None:
    print(f"{'case':<26}{'render ms':>10}{'baseline ms':>13}{'ratio':>8}{'size':>11}")
    for case in CASES:
        bench_case(*case)


async def bench_provider() -> None:
    catalog = load_catalog()

    def request(n: int) -> ImageRequest:
        return validate(GenerationParams(prompt=PROMPT, n=n), catalog, "local")

    provider = LocalProvider(max_workers=2)
    one, four = request(1), request(4)
    try:
        await provider.generate(four)  # warm-up
        sequential: list[float] = []
        concurrent: list[float] = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(4):
                await provider.generate(one)
            sequential.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            await provider.generate(four)
            concurrent.append((time.perf_counter() - start) * 1000)
    finally:
        await provider.aclose()
    seq, conc = statistics.median(sequential), statistics.median(concurrent)
    print(
        f"\nLocalProvider 1024x1024 png, 2 workers: 4 x n=1 sequential {seq:.0f} ms, "
        f"n=4 concurrent {conc:.0f} ms, speedup {seq / conc:.2f}x"
    )


if __name__ == "__main__":
    bench_render()
    asyncio.run(bench_provider())
