"""Regenerate the committed Python code and Envoy descriptor set from proto/.

Usage: python proto/generate.py [OUT_DIR]   (default: proto/, in place)

The only generator: `make proto` runs it, and tests/test_proto_fresh.py runs it
into a temporary directory and compares, so committed output never goes stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import google.api.annotations_pb2
import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
SOURCES = [
    "imagegate/v1/accounts.proto",
    "imagegate/v1/images.proto",
    "imagegate/v1/admin.proto",
]
DESCRIPTOR = "imagegate/v1/imagegate.pb"
# Detail types Envoy must know to print a google.rpc.Status as JSON.
DESCRIPTOR_EXTRAS = ["google/rpc/error_details.proto", "google/rpc/status.proto"]


def _includes() -> list[str]:
    googleapis = Path(google.api.annotations_pb2.__file__).resolve().parents[2]
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    return [f"-I{PROTO_ROOT}", f"-I{googleapis}", f"-I{well_known}"]


def _protoc(args: list[str]) -> None:
    code = protoc.main(["grpc_tools.protoc", *_includes(), *args])
    if code != 0:
        raise SystemExit(f"protoc failed ({code}): {' '.join(args)}")


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DESCRIPTOR).parent.mkdir(parents=True, exist_ok=True)
    _protoc(
        [
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *SOURCES,
        ]
    )
    _protoc(
        [
            f"--descriptor_set_out={out_dir / DESCRIPTOR}",
            "--include_imports",
            *SOURCES,
            *DESCRIPTOR_EXTRAS,
        ]
    )


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
