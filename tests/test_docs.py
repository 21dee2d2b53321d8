"""The README documents the code as it is: every setting (in docs/configuration.md, which
tests/test_config.py keeps fresh), and the CLI's commands."""

from __future__ import annotations

from pathlib import Path

from service.cli import _parser
from service.config_commands import settings_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def test_every_setting_is_documented() -> None:
    assert "(docs/configuration.md)" in README
    missing = [r.env for r in settings_table() if f"`{r.env}`" not in CONFIGURATION]
    assert not missing, f"undocumented settings: {missing}"


def test_every_cli_command_is_in_the_readme() -> None:
    (commands,) = [a.choices for a in _parser()._actions if isinstance(a.choices, dict)]
    assert "serve" in commands
    for name in commands:
        assert f"imagegate {name}" in README, name
