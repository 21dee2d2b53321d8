"""The one loader: each setting's default, then its IMAGEGATE_* variable, then its flag,
parsed and checked; a bad value stops with a SettingError naming it and where it came from."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from settings.fields import Setting, parse, rows


class SettingError(ValueError):
    """An invalid setting: its name, where its value came from, what is wrong."""

    def __init__(self, row: Setting, source: str, problem: str) -> None:
        self.name, self.source, self.problem = row.name, source, problem
        super().__init__(f"invalid setting {row.name} ({source}): {problem}")


C = TypeVar("C")


def load(
    cls: type[C],
    env: Mapping[str, str],
    flags: Mapping[str, object] | None = None,
) -> C:
    """An instance of the config dataclass `cls`. `flags`: setting name -> the flag's
    text (or an already typed value); None and absent mean the flag was not given.
    An empty variable counts as unset."""
    flags = flags or {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    table = {row.name: row for row in rows(cls)}
    for row in table.values():
        raw: object = flags.get(row.name)
        source = f"{row.flag or row.name} {_shown(row, raw)}"
        if raw is None:
            raw = env.get(row.env) or None
            source = f"{row.env}{'' if row.secret else '=' + repr(raw)}"
        if raw is None:
            value, source = row.default, "its default"
        elif isinstance(raw, str):
            try:
                value = None if row.optional and not raw.strip() else parse(row, raw)
            except ValueError as exc:
                raise SettingError(row, source, str(exc)) from None
        else:
            value = raw
        if row.check is not None and value is not None:
            try:
                row.check(value)
            except ValueError as exc:
                raise SettingError(row, source, str(exc)) from None
        values[row.name], sources[row.name] = value, source
    config = cls(**values)
    for name, problem in _conflicts(config):
        raise SettingError(table[name], sources[name], problem)
    return config


def _shown(row: Setting, raw: object) -> str:
    return "(secret)" if row.secret else repr(raw)


def _conflicts(config: object) -> Iterator[tuple[str, str]]:
    """A config class may say which values are valid alone but not together: a method
    conflicts() yielding (setting name, problem)."""
    method = getattr(config, "conflicts", None)
    if method is not None:
        yield from method()


def table(*configs: tuple[type, Sequence[str]]) -> list[Setting]:
    """Every setting of the config dataclasses, in declaration order; a name in several
    (the same setting read by several processes) is one row, the commands of all. The
    CLI is built from this, so it never raises: disagreements() is for the tests."""
    merged: dict[str, Setting] = {}
    for cls, commands in configs:
        for row in rows(cls, commands):
            seen = merged.get(row.name)
            if seen is None:
                merged[row.name] = row
                continue
            # A plain field (no setting()) beside a declared one: the declared one.
            base = row if row.meaning and not seen.meaning else seen
            merged[row.name] = dataclasses.replace(
                base,
                commands=tuple(dict.fromkeys((*seen.commands, *row.commands))),
                owners=(*seen.owners, *row.owners),
            )
    return list(merged.values())


SAME = ("kind", "optional", "default", "meaning", "flag", "secret", "default_text")


def disagreements(*configs: tuple[type, Sequence[str]]) -> list[str]:
    """Settings of the same name declared differently in two config dataclasses, and
    fields declared without setting() (no meaning)."""
    problems: list[str] = []
    first: dict[str, Setting] = {}
    for cls, commands in configs:
        for row in rows(cls, commands):
            if not row.meaning:
                problems.append(f"{cls.__name__}.{row.name}: not a setting() with a meaning")
            seen = first.setdefault(row.name, row)
            differ = [a for a in SAME if getattr(seen, a) != getattr(row, a)]
            if seen is not row and differ:
                owners = f"{seen.owners[0]} and {cls.__name__}"
                problems.append(f"{row.name}: declared differently in {owners}: {differ}")
    return problems
