"""Versioned schema migrations: numbered SQL files per dialect, applied in order, never edited.

Layout: `sqlite/NNNN_name.sql` and `postgres/NNNN_name.sql`, the same numbers and
names in both dialects (a test checks), each file one migration applied in one
transaction together with its `schema_version` row (version, name, applied_at).
A released file is never changed: a schema change (say an idempotency table) is
a new file in both folders, the store methods that use it in both stores, and
their cases in tests/test_store_contract.py. SQLite runs DDL in a transaction
too, but a change that needs `PRAGMA foreign_keys=OFF` (a table rebuild) cannot:
prefer ADD COLUMN and new tables.

SQLite files made before versioned migrations have no schema_version: they are
version 1, and may already hold the columns of 2 and 3, which imagegate then
added on open (sqlite.py skips those). PostgreSQL has no such past.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from service.store.base import SchemaOutdated, SchemaTooNew

Dialect = Literal["sqlite", "postgres"]
_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # the file name without .sql, e.g. "0001_initial"
    sql: str


@cache
def migrations(dialect: Dialect) -> tuple[Migration, ...]:
    """The dialect's migrations in order; versions run 1, 2, 3... without gaps."""
    found = []
    for entry in resources.files(__package__).joinpath(dialect).iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name[:-4], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{dialect} migrations are not numbered 1..n: {[m.name for m in found]}")
    return tuple(found)


def latest(dialect: Dialect) -> int:
    return len(migrations(dialect))


def pending(dialect: Dialect, current: int) -> tuple[Migration, ...]:
    return migrations(dialect)[current:]


def check_not_newer(current: int, dialect: Dialect) -> None:
    known = latest(dialect)
    if current > known:
        raise SchemaTooNew(
            f"the database schema is at version {current}, newer than this imagegate knows "
            f"({known}); run the imagegate version that migrated it, or a newer one"
        )


def check_current(current: int, dialect: Dialect) -> None:
    """For a store that does not migrate itself: refuse an unknown or outdated schema."""
    check_not_newer(current, dialect)
    known = latest(dialect)
    if current == 0:
        raise SchemaOutdated(
            "the database has no imagegate schema yet: run `imagegate migrate` first"
        )
    if current < known:
        raise SchemaOutdated(
            f"the database schema is at version {current}, this imagegate needs {known}: "
            "run `imagegate migrate` first"
        )
