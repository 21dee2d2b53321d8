"""`make bench` in its quickest mode produces a well-formed report (no figure is judged:
speed is the bench's business, not a test's)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("fake", "aiohttp", "grpc")


@pytest.mark.skipif(
    shutil.which("h2load") is None or shutil.which("wrk") is None,
    reason="the bench needs h2load (nghttp2-client) and wrk",
)
def test_quick_bench_writes_the_report_and_chart(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "bench/bench.py", "--quick", "--targets", ",".join(TARGETS),
         "--workers", "2", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert [r["key"] for r in data["results"]] == list(TARGETS)
    for r in data["results"]:
        assert r["sequential"]["p50_ms"] > 0 and r["steps"], r
        assert r["max_rps"] > 0 and r["cpu_ms"] and r["peak_rss_mb"], r
        assert r["errors"] == 0, r
    assert data["machine"]["cores"] >= 1 and data["machine"]["ceiling"]["wrk_rps"] > 0
    page = (tmp_path / "benchmarks.md").read_text()
    assert "Quick mode" in page and "![p50 and p99 latency" in page
    for label in ("(a) fake upstream", "(b) imagegate, aiohttp front", "(d) imagegate, gRPC"):
        assert page.count(f"| {label}") == 2, label  # the latency table and the payload table
    assert (tmp_path / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
