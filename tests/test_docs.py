"""The README documents the code as it is: every setting, and the CLI's commands."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gateway.config import GatewayConfig
from service.cli import _parser
from service.config import Config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    names = {f.name for f in dataclasses.fields(Config)} | {
        f.name for f in dataclasses.fields(GatewayConfig)
    }
    missing = sorted(n for n in names if f"`IMAGEGATE_{n.upper()}`" not in README)
    assert not missing, f"undocumented settings: {missing}"


def test_every_cli_command_is_in_the_readme() -> None:
    (commands,) = [a.choices for a in _parser()._actions if isinstance(a.choices, dict)]
    assert "serve" in commands
    for name in commands:
        assert f"imagegate {name}" in README, name
