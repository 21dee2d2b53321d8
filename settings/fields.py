"""A setting is a dataclass field declared with `setting()`: its default, its one-line
meaning, its flag and its check, all in one place; `rows()` reads them back as a table."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
# A check raises ValueError saying what is wrong with a parsed value.
Check = Callable[[Any], None]
ENV_PREFIX = "IMAGEGATE_"
# Where a setting has a flag: the commands that take it ("imagegate": before the command).
SERVICE = ("serve", "serve-grpc")
FRONT = ("serve", "serve-rest")
EVERY_COMMAND = ("imagegate",)
NO_FLAG = ""


def setting(
    default: T,
    meaning: str,
    *,
    check: Check | None = None,
    flag: str | None = None,
    commands: Sequence[str] | None = None,
    secret: bool = False,
    default_text: str = "",
    metavar: str = "",
) -> T:
    """A dataclass field that is a setting. `flag`: None derives it from the name
    (`upstream_timeout_s` -> `--upstream-timeout`), NO_FLAG means the environment only.
    `commands`: None means those of the process its class configures. `secret`: never
    printed (repr, errors, docs). `default_text`: what the default means, for the docs."""
    meta = {
        "meaning": meaning,
        "check": check,
        "flag": flag,
        "commands": None if commands is None else tuple(commands),
        "secret": secret,
        "default_text": default_text,
        "metavar": metavar,
    }
    field: T = dataclasses.field(default=default, repr=not secret, metadata=meta)
    return field


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the configuration table."""

    name: str
    kind: type  # str, int, float, bool or Path
    optional: bool  # `Path | None`: unset is None
    default: object
    meaning: str
    check: Check | None
    flag: str  # "" for none
    commands: tuple[str, ...]
    secret: bool
    default_text: str
    metavar: str
    owners: tuple[str, ...]  # the dataclasses holding it

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def rows(cls: type, commands: Sequence[str] = ()) -> Iterator[Setting]:
    """The settings of one config dataclass, whose flags go to `commands` by default.
    A plain field (no `setting()`) still loads, typed by its annotation; its meaning is
    empty, which the docs test refuses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _kind(hints[f.name], f.name)
        meta = f.metadata
        flag = meta.get("flag")
        if flag is None:
            flag = "--" + f.name.removesuffix("_s").replace("_", "-")
        yield Setting(
            name=f.name,
            kind=kind,
            optional=optional,
            default=f.default,
            meaning=meta.get("meaning", ""),
            check=meta.get("check"),
            flag=flag,
            commands=meta.get("commands") or tuple(commands),
            secret=meta.get("secret", False),
            default_text=meta.get("default_text", ""),
            metavar=meta.get("metavar", ""),
            owners=(cls.__name__,),
        )


def _kind(hint: object, name: str) -> tuple[type, bool]:
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and isinstance(args[0], type):
            return args[0], True
    if hint in (str, int, float, bool, Path):
        return typing.cast(type, hint), False
    raise TypeError(f"setting {name}: unsupported type {hint!r}")


# Parsing text (an environment variable or a flag) into the setting's type.

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse(row: Setting, raw: str) -> object:
    text = raw.strip()
    if row.kind is bool:
        if text.lower() in TRUE:
            return True
        if text.lower() in FALSE:
            return False
        raise ValueError("not a boolean: use true or false")
    if row.kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("not a whole number") from None
    if row.kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    if row.kind is Path:
        if not text:
            raise ValueError("an empty path")
        return Path(text)
    return raw


# Checks, named by what they accept; each says so for the docs' "accepts" column
# ("{kind}" stands for the setting's type: whole number, number...).

KINDS: dict[type, str] = {
    bool: "true or false",
    int: "whole number",
    float: "number",
    Path: "path",
    str: "text",
}
_ACCEPTS: dict[Check, str] = {}


def _accepts(text: str, check: Check) -> Check:
    _ACCEPTS[check] = text
    return check


def accepted(row: Setting) -> str:
    """What a value of `row` may be, in a few words."""
    text = _ACCEPTS.get(row.check, "{kind}") if row.check is not None else "{kind}"
    return text.format(kind=KINDS[row.kind])


def _num(value: float) -> str:
    """3 and 3.0 as 3, 2.5 as 2.5: never 1e+06."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def between(low: float, high: float | None = None) -> Check:
    def check(value: float) -> None:
        if value < low or (high is not None and value > high):
            limits = f"between {_num(low)} and {_num(high)}" if high is not None else ""
            raise ValueError(f"{_num(value)} is not {limits or 'at least ' + _num(low)}")

    if high is None:
        return _accepts(f"{{kind}} >= {_num(low)}", check)
    return _accepts(f"{{kind}} {_num(low)}-{_num(high)}", check)


def positive(value: float) -> None:
    if value <= 0:
        raise ValueError(f"{_num(value)} is not above 0")


def port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port number (0-65535; 0 picks a free one)")


def one_of(*choices: str) -> Check:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")

    return _accepts(" or ".join(f"`{c}`" for c in choices), check)


def not_empty(value: str) -> None:
    if not value.strip():
        raise ValueError("must not be empty")


def host_port(value: str, *, off: bool = False) -> None:
    """HOST:PORT, [IPv6]:PORT; `off` also accepts off/none."""
    if off and value.strip().lower() in ("off", "none"):
        return
    host, sep, number = value.strip().rpartition(":")
    if not sep or not host or not number.isdigit() or int(number) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT" + (" or off" if off else ""))


def address_or_off(value: str) -> None:
    host_port(value, off=True)


def grpc_target(value: str) -> None:
    """HOST:PORT, or a gRPC name with a resolver scheme (dns:///..., unix:...)."""
    if value.startswith(("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:")):
        return
    host_port(value)


def url(*schemes: str, empty: bool = True, show: bool = True) -> Check:
    """A URL of one of `schemes` with a host (or a path for sqlite:///); `show=False`
    for URLs that may hold a password: only the scheme is repeated."""

    def check(value: str) -> None:
        if not value and empty:
            return
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        shown = repr(value) if show else f"a {scheme or 'scheme-less'} URL"
        if scheme not in schemes:
            raise ValueError(f"{shown} is not a {' or '.join(s + '://' for s in schemes)} URL")
        if scheme == "sqlite":
            if not value.startswith("sqlite:///") or len(value) == len("sqlite:///"):
                raise ValueError("use sqlite:///PATH")
        elif not parts.netloc:
            raise ValueError(f"{shown} has no host")

    shown = ", ".join("`sqlite:///PATH`" if s == "sqlite" else f"`{s}://`" for s in schemes)
    return _accepts(f"{shown} URL" + (" or empty" if empty else ""), check)


def existing_file(value: Path) -> None:
    if not value.is_file():
        raise ValueError(
            f"{str(value)!r} is not a file" + ("" if value.exists() else " (no such path)")
        )


def networks(value: str) -> None:
    """Comma-separated addresses or CIDR blocks."""
    for part in value.split(","):
        entry = part.strip()
        if not entry:
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an address or CIDR block") from None


def hosts(value: str) -> None:
    """Comma-separated host names, exact or *.suffix."""
    for part in value.split(","):
        entry = part.strip()
        if entry and (any(c in entry for c in "/:@ ") or "*" in entry.removeprefix("*.")):
            raise ValueError(f"{entry!r} is not a host name or *.suffix")


_KNOWN: dict[Check, str] = {
    positive: "{kind} > 0",
    port: "port 0-65535 (0: any free one)",
    not_empty: "non-empty text",
    address_or_off: "HOST:PORT or `off`",
    grpc_target: "HOST:PORT or a gRPC target (`dns:///`, `unix:`)",
    existing_file: "path of a file",
    networks: "comma-separated addresses or CIDRs",
    hosts: "comma-separated hosts or `*.suffix`",
}
_ACCEPTS.update(_KNOWN)
