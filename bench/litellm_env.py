"""LiteLLM's proxy, the peer the bench measures, in its own virtualenv (bench/.venv).

Never in the project's environment. Recent `litellm[proxy]` releases pin packages
this machine's registry lacks; 1.106.10 resolves once its exact `certifi` pin is
relaxed, so its `proxy` dependencies are read from the wheel's metadata, installed
with that pin dropped, and LiteLLM itself goes in with --no-deps.

    python bench/litellm_env.py      # installs on first use, prints the binary's path
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

VERSION = "1.106.10"
VENV = Path(__file__).resolve().parent / ".venv"
BINARY = VENV / "bin" / "litellm"
# Pins relaxed: the package name's requirement becomes unpinned.
RELAXED = ("certifi",)


def ensure() -> Path:
    """The `litellm` binary of bench/.venv, installed first if missing."""
    if BINARY.exists():
        return BINARY
    if not (VENV / "bin" / "python").exists():
        venv.create(VENV, with_pip=True)
    python = str(VENV / "bin" / "python")
    with tempfile.TemporaryDirectory() as tmp:
        _pip(python, "download", "--no-deps", "-d", tmp, f"litellm=={VERSION}")
        [wheel] = Path(tmp).glob("litellm-*.whl")
        requirements = proxy_requirements(_metadata(wheel))
        _pip(python, "install", *requirements)
        _pip(python, "install", "--no-deps", str(wheel))
    return BINARY


def _pip(python: str, *args: str) -> None:
    subprocess.run([python, "-m", "pip", "-q", *args], check=True)


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        [name] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return z.read(name).decode()


def proxy_requirements(metadata: str) -> list[str]:
    """Requires-Dist lines needed by `litellm[proxy]` on this Python, RELAXED unpinned."""
    from packaging.requirements import Requirement

    out: list[str] = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.removeprefix("Requires-Dist:").strip())
        marker = req.marker
        if marker is not None and not any(
            marker.evaluate({"extra": extra}) for extra in ("", "proxy")
        ):
            continue
        req.marker = None
        if req.name.lower() in RELAXED:
            req.specifier = type(req.specifier)()
        out.append(str(req))
    return out


if __name__ == "__main__":
    print(ensure())
    sys.exit(0)
