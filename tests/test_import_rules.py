"""DESIGN.md's import rules, checked on the source: the seams stay where they are."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The domain core: everything in service/ but the gRPC edge and the process wiring.
GRPC_EDGE = {
    "servicer.py",
    "grpc_errors.py",
    "server.py",
    "cli.py",
    # `serve --workers N`: spawns service and front processes, as cli.py runs both.
    "workers.py",
    # The interceptor, the health service and the /metrics listener (aiohttp).
    "grpc_observe.py",
    "lifecycle.py",
    "admin_http.py",
    # The CLI's settings table: the service's Config and the front's GatewayConfig.
    "config_commands.py",
    "admin_servicer.py",
}
GRPC = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "imagegate", "gateway")
# Provider adapters and image backends may use HTTP and vendor libraries (aiohttp,
# botocore, google-auth)...
FORBIDDEN_IN_ADAPTERS = (*GRPC, "google.protobuf", "google.rpc", "google.api")
# ...the rest of the domain core none of them.
FORBIDDEN_IN_CORE = (
    *GRPC,
    "google",
    "openai",
    "aiohttp",
    "boto3",
    "botocore",
    "aiobotocore",
    "replicate",
)
ADAPTERS = ROOT / "service" / "providers"
IMAGE_BACKENDS = ROOT / "service" / "imagestore"


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


def test_settings_package_imports_only_the_standard_library() -> None:
    # Both the service's core and the front declare their settings with it.
    files = list((ROOT / "settings").rglob("*.py"))
    assert {"fields.py", "loader.py"} <= {p.name for p in files}
    for path in files:
        for name in _imports(path):
            top = _top(name)
            assert top == "settings" or top in sys.stdlib_module_names, (path, name)


def _forbidden(name: str, rules: tuple[str, ...]) -> bool:
    return any(name == rule or name.startswith(rule + ".") for rule in rules)


def test_domain_core_imports_no_grpc_generated_code_or_vendor_sdk() -> None:
    core = [
        p
        for p in (ROOT / "service").rglob("*.py")
        if p.name not in GRPC_EDGE and not {ADAPTERS, IMAGE_BACKENDS} & set(p.parents)
    ]
    assert any(p.name == "core.py" for p in core)
    for path in core:
        bad = {n for n in _imports(path) if _forbidden(n, FORBIDDEN_IN_CORE)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_provider_adapters_and_image_backends_import_no_grpc() -> None:
    adapters = [*ADAPTERS.rglob("*.py"), *IMAGE_BACKENDS.rglob("*.py")]
    assert {"http.py", "s3.py"} <= {p.name for p in adapters}
    for path in adapters:
        bad = {n for n in _imports(path) if _forbidden(n, FORBIDDEN_IN_ADAPTERS)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_checker_sees_imports() -> None:
    # Guard against a checker that silently finds nothing.
    assert "grpc" in _imports(ROOT / "service" / "servicer.py")
    assert "aiohttp" in _imports(ADAPTERS / "http.py")
    assert "botocore.session" in _imports(IMAGE_BACKENDS / "s3.py")
    assert _forbidden("grpc.aio", FORBIDDEN_IN_ADAPTERS)
    assert _forbidden("google.auth", FORBIDDEN_IN_CORE)
    assert not _forbidden("google.auth", FORBIDDEN_IN_ADAPTERS)
    assert "service.core" in _imports(ROOT / "service" / "servicer.py")
