"""The table as argparse flags and as docs/configuration.md."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path

from settings.fields import Setting, accepted

# argparse's dest of a setting's flag: apart from the commands' own arguments.
DEST = "setting_"


def add_flags(parser: argparse.ArgumentParser, rows: Iterable[Setting], command: str) -> None:
    """The flags of the settings `command` reads; their text is parsed by the loader."""
    for row in rows:
        if command in row.commands:
            _add(parser, row)


def add_named_flags(parser: argparse.ArgumentParser, rows: Iterable[Setting], *names: str) -> None:
    """The flags of the settings `names`, for commands that read only those."""
    for row in rows:
        if row.name in names:
            _add(parser, row)


def _add(parser: argparse.ArgumentParser, row: Setting) -> None:
    # argparse formats help with %: a literal one is doubled.
    text = f"{row.meaning} [{row.env}, {_default(row)}]".replace("%", "%%")
    if row.flag and row.kind is bool:
        # --uvloop / --no-uvloop: a typed value the loader takes as it is.
        action = argparse.BooleanOptionalAction
        parser.add_argument(row.flag, dest=DEST + row.name, action=action, help=text)
    elif row.flag:
        parser.add_argument(
            row.flag,
            dest=DEST + row.name,
            metavar=_metavar(row),
            help=text,
        )


def flag_values(args: argparse.Namespace) -> dict[str, object]:
    """setting name -> the text of its flag (True or False for a boolean's), for each
    flag given."""
    return {
        dest.removeprefix(DEST): value
        for dest, value in vars(args).items()
        if dest.startswith(DEST) and value is not None
    }


def _metavar(row: Setting) -> str:
    if row.metavar:
        return row.metavar
    if row.kind is Path:
        return "PATH"
    if row.kind is float and row.name.endswith("_s"):
        return "SECONDS"
    if row.kind in (int, float):
        return "N"
    return "TEXT"


def _default(row: Setting) -> str:
    if row.default_text:
        return row.default_text
    if row.default is None or row.default == "":
        return "not set"
    if isinstance(row.default, float) and row.default.is_integer():
        return str(int(row.default))
    return str(row.default)


HEADER = """\
# Configuration

<!-- Generated from the config dataclasses (service/config.py, gateway/config.py) by
`make docs` (`imagegate config docs`); tests/test_config.py checks it is fresh.
Edit the `setting()` declarations, not this file. -->

Every setting is read once at start-up: its default, then its environment variable,
then its flag (a flag wins). An empty variable counts as unset. A value that does not
parse or check stops `imagegate serve`, `serve-grpc` and `serve-rest` before they
bind anything, exit status 2, with one line naming the setting and where its value
came from, e.g.

    $ imagegate serve --rest-port 8o80
    imagegate: invalid setting rest_port (--rest-port '8o80'): not a whole number

`imagegate config check [--catalog FILE] [flags of serve]` loads the settings from
the environment and flags, loads and checks the catalog and reports which providers
have their credentials, without binding a port or opening the database: exit 0 with a
summary, or 2 with what is wrong. Flags of the log settings come before the command
(`imagegate --log-format text serve`). Secret settings have no flag (a command line
shows in `ps`) or are never printed back.

| variable | flag | default | accepts | read by | meaning |
|---|---|---|---|---|---|
"""


def markdown(rows: Iterable[Setting], commands: Mapping[str, str]) -> str:
    """docs/configuration.md; `commands`: how each command name is shown."""
    lines = [HEADER.rstrip("\n")]
    for row in rows:
        flag = f"`{row.flag}`" if row.flag else "—"
        if row.flag and row.kind is bool:
            flag += f", `--no-{row.flag.removeprefix('--')}`"
        read_by = ", ".join(commands.get(c, c) for c in row.commands)
        lines.append(
            f"| `{row.env}` | {flag} | {_code(_default(row), row)} | {accepted(row)} "
            f"| {read_by} | {row.meaning} |"
        )
    return "\n".join(lines) + "\n"


def _code(text: str, row: Setting) -> str:
    if row.default_text or row.default is None or row.default == "":
        return text
    return f"`{text}`"
