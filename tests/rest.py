"""A raw HTTP client for the REST contract tests: status, headers and exact body bytes."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    method: str,
    url: str,
    *,
    key: str | None = None,
    body: bytes | None = None,
    json_body: object = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    if json_body is not None:
        body = json.dumps(json_body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    # BytesIO: aiohttp warns that large raw bytes bodies could block the loop.
    data = io.BytesIO(body) if body is not None else None
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, headers=hdrs) as resp,
    ):
        return Reply(resp.status, resp.headers, await resp.read())


def assert_error(
    reply: Reply, status: int, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error shape: all four keys, exact values, JSON content type."""
    assert reply.status == status, (reply.status, reply.body[:500])
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.headers.get("x-request-id")
    body = reply.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert list(error) == ["message", "type", "param", "code"]
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    for name in reply.headers:
        assert not name.lower().startswith(("grpc-", "imagegate-")), name
    return error
