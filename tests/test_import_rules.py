"""DESIGN.md's import rules, checked on the source: the seams stay where they are."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The domain core: everything in service/ but the gRPC edge and the process wiring.
GRPC_EDGE = {"servicer.py", "grpc_errors.py", "server.py", "cli.py"}
FORBIDDEN_IN_CORE = (
    "grpc",
    "grpc_status",
    "grpc_health",
    "grpc_reflection",
    "google",
    "imagegate",
    "openai",
    "aiohttp",
    "gateway",
    "boto3",
    "replicate",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def test_gateway_never_imports_service() -> None:
    files = list((ROOT / "gateway").rglob("*.py"))
    assert files
    for path in files:
        assert not {n for n in _imports(path) if _top(n) == "service"}, path


def test_domain_core_imports_no_grpc_generated_code_or_vendor_sdk() -> None:
    core = [p for p in (ROOT / "service").rglob("*.py") if p.name not in GRPC_EDGE]
    assert any(p.name == "core.py" for p in core)
    for path in core:
        bad = {n for n in _imports(path) if _top(n) in FORBIDDEN_IN_CORE}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_checker_sees_imports() -> None:
    # Guard against a checker that silently finds nothing.
    assert "grpc" in _imports(ROOT / "service" / "servicer.py")
    assert "service.core" in _imports(ROOT / "service" / "servicer.py")
