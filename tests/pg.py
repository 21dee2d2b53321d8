"""The test machine's PostgreSQL: find it, and give each test a schema of its own.

Each schema is named after this process and a random suffix, so parallel runs
and reruns never share tables, and is dropped when its test ends. A URL's
`search_path` query parameter selects it (asyncpg passes unknown parameters on
as server settings), so subprocesses and services get it from the URL alone.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

# The machine's PostgreSQL trusts local users; which role exists depends on the image.
CANDIDATES = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
)
ENV = "IMAGEGATE_TEST_POSTGRES_URL"


async def find_server() -> tuple[str | None, str]:
    """The first URL that connects, or None and why none did."""
    explicit = os.environ.get(ENV)
    errors = []
    for url in (explicit,) if explicit else CANDIDATES:
        try:
            conn = await asyncpg.connect(url, timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            parts = urlsplit(url)
            where = f"{parts.username}@{parts.hostname}:{parts.port}{parts.path}"
            errors.append(f"{where}: {type(exc).__name__}: {exc}")
            continue
        await conn.close()
        return url, ""
    return None, "; ".join(errors)


def with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def create_schema(server_url: str) -> tuple[str, str]:
    """A new empty schema: (its name, a URL that uses it)."""
    name = f"imagegate_test_{os.getpid()}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await conn.close()
    return name, with_schema(server_url, name)


async def drop_schema(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url)
