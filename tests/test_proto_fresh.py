"""The committed generated code and descriptor set are exactly what proto/generate.py makes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = [
    f"{name}{suffix}"
    for name in ("accounts", "images", "admin")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
] + ["imagegate.pb"]


def test_committed_generated_files_are_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / "imagegate" / "v1" / name).read_bytes()
        committed = (ROOT / "proto" / "imagegate" / "v1" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit"
