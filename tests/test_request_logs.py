"""Structured request logs over the whole error table: one JSON line per request in each
process it crosses (the front's `imagegate.access`, the service's `imagegate.request`),
with its fields, and never a key, a prompt, image bytes or a credential anywhere.

Every row the aiohttp front and the service can produce today is triggered: 400s,
401, 402, 403, 404s, 405, 409, 413, 429, 502 from a failing fake upstream, 503 from a
front whose service is down, 504 from a front with a short deadline, and successes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.config import GatewayConfig
from gateway.server import bound_port, start_gateway
from service import keys
from service.logs import JsonFormatter, TextFormatter
from service.store.base import KeyLimits
from tests.conftest import Stack, make_tenant
from tests.fakes.base import Fault, image_bytes
from tests.fakes.openai import FakeOpenAI
from tests.ops_kit import poll
from tests.providers_harness import UNIT_PRICE, model, provider, provider_stack, route
from tests.rest import Reply, call

UPSTREAM_KEY = "sk-upstream-credential-5f4e3d2c1b0a99887766"
PROMPT = "a secret-garden-prompt that must stay out of info logs"
SERVICE_FIELDS = {
    "request_id", "rpc", "key_id", "account", "model", "n", "size", "quality", "route",
    "status", "reason", "cost_micros", "upstream_ms", "total_ms",
}  # fmt: skip
FRONT_FIELDS = {"request_id", "method", "path", "route", "status", "code", "total_ms"}
# Runs of base64 long enough to be image bytes.
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{120,}={0,2}")


class Capture(logging.Handler):
    """Every record of every logger, at every level, as the JSON formatter writes it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, self.format(record)))

    def objects(self, logger: str, request_id: str) -> list[dict[str, Any]]:
        found = [json.loads(line) for _, line in self.lines]
        return [o for o in found if o["logger"] == logger and o.get("request_id") == request_id]


@contextlib.contextmanager
def captured() -> Iterator[Capture]:
    root = logging.getLogger()
    capture, level = Capture(), root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(level)


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    upstream = FakeOpenAI(openai_key=UPSTREAM_KEY, compatible_models={"flux-schnell"})
    upstream.stall_s = 3.0
    upstream.echo_in_errors = UPSTREAM_KEY  # the upstream quotes our credential back
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture(scope="module")
async def lstack(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI
) -> AsyncIterator[Stack]:
    async with provider_stack(
        tmp_path_factory.mktemp("logs"),
        providers={
            "compat": provider(
                "openai_compatible", fake.openai_base, max_n=4, api_key_env="OPENAI_API_KEY"
            )
        },
        models={
            "flux": model(route("compat", "flux-schnell")),
            "other": model(route("compat", "flux-schnell")),
        },
        env={"OPENAI_API_KEY": UPSTREAM_KEY},
        envoy=False,
    ) as stack:
        yield stack


@dataclass
class Row:
    name: str
    status: int
    code: str | None
    # The service's gRPC status and reason; None: the service never saw the request.
    grpc: tuple[str, str | None] | None
    # Another status and reason the service may log for the same answer.
    alternative: tuple[str, str | None] | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_one_json_line_per_request_per_process_over_the_error_table(
    lstack: Stack, fake: FakeOpenAI
) -> None:
    service = lstack.service
    rich = await make_tenant(service, "1")
    poor = await make_tenant(service, "0.000001")
    limited = await make_tenant(service, "1", models=("other",))
    # A key allowed one request a minute (the 429 row).
    once = keys.new_key()
    await service.store.create_key(
        rich.account, keys.hash_key(once), keys.display_prefix(once), "once", None,
        limits=KeyLimits(rpm=1),
    )  # fmt: skip
    front = lstack.fronts["aiohttp"]
    # A front whose service is down (503), and one with a short deadline (504).
    down = await start_gateway(GatewayConfig(grpc_target=f"127.0.0.1:{_free_port()}"), port=0)
    target = f"127.0.0.1:{service.port}"
    hasty = await start_gateway(GatewayConfig(grpc_target=target, timeout_s=0.5), port=0)
    down_url = f"http://127.0.0.1:{bound_port(down)}"
    hasty_url = f"http://127.0.0.1:{bound_port(hasty)}"
    gen = "/v1/images/generations"
    body = {"model": "flux", "prompt": PROMPT}
    unknown_key = keys.new_key()
    sent: dict[str, tuple[Row, Reply]] = {}

    async def request(
        row: Row,
        method: str,
        url: str,
        key: str | None = rich.key,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> Reply:
        rid = f"log-{row.name}"
        headers = {"x-request-id": rid, **(headers or {})}
        reply = await call(method, url, key=key, headers=headers, **kw)
        assert reply.status == row.status, (row.name, reply.status, reply.body[:300])
        sent[rid] = (row, reply)
        return reply

    try:
        with captured() as capture:
            ok = Row("ok", 200, None, ("OK", None))
            await request(
                ok, "POST", front + gen, json_body={**body, "response_format": "b64_json"}
            )
            await request(
                Row("ok-url", 200, None, ("OK", None)), "POST", front + gen, json_body=body
            )
            await request(
                Row("bad-json", 400, "invalid_json", None), "POST", front + gen, body=b"{nope"
            )
            await request(
                Row("bad-size", 400, "invalid_value", ("INVALID_ARGUMENT", "INVALID_PARAMETER")),
                "POST",
                front + gen,
                json_body={**body, "size": "3x3"},
            )
            await request(
                Row(
                    "no-prompt",
                    400,
                    "missing_required_parameter",
                    ("INVALID_ARGUMENT", "INVALID_PARAMETER"),
                ),
                "POST",
                front + gen,
                json_body={"model": "flux"},
            )
            await request(
                Row(
                    "no-model", 400, "model_not_found", ("INVALID_ARGUMENT", "MODEL_NOT_SUPPORTED")
                ),
                "POST",
                front + gen,
                json_body={**body, "model": "nope"},
            )
            fake.inject(Fault.SAFETY)
            await request(
                Row(
                    "safety",
                    400,
                    "content_policy_violation",
                    ("INVALID_ARGUMENT", "CONTENT_POLICY"),
                ),
                "POST",
                front + gen,
                json_body=body,
            )
            await request(
                Row("bad-key", 401, "invalid_api_key", ("UNAUTHENTICATED", "INVALID_API_KEY")),
                "POST",
                front + gen,
                key=unknown_key,
                json_body=body,
            )
            await request(
                Row(
                    "poor",
                    402,
                    "insufficient_quota",
                    ("FAILED_PRECONDITION", "INSUFFICIENT_BALANCE"),
                ),
                "POST",
                front + gen,
                key=poor.key,
                json_body=body,
            )
            await request(
                Row(
                    "limited", 403, "model_not_allowed", ("PERMISSION_DENIED", "MODEL_NOT_ALLOWED")
                ),
                "POST",
                front + gen,
                key=limited.key,
                json_body=body,
            )
            idem = {"Idempotency-Key": "idem-1"}
            ok_idem = Row("idem-first", 200, None, ("OK", None))
            await request(ok_idem, "POST", front + gen, json_body=body, headers=idem)
            await request(
                Row(
                    "idem-conflict",
                    409,
                    "idempotency_key_conflict",
                    ("ALREADY_EXISTS", "IDEMPOTENCY_CONFLICT"),
                ),
                "POST",
                front + gen,
                json_body={**body, "n": 2},
                headers=idem,
            )
            ok_once = Row("rpm-first", 200, None, ("OK", None))
            await request(ok_once, "POST", front + gen, key=once, json_body=body)
            await request(
                Row("rpm", 429, "rate_limit_exceeded", ("RESOURCE_EXHAUSTED", "RATE_LIMITED")),
                "POST",
                front + gen,
                key=once,
                json_body=body,
            )
            await request(
                Row("no-image", 404, "image_not_found", ("NOT_FOUND", "IMAGE_NOT_FOUND")),
                "GET",
                front + "/v1/images/files/nope.png?expires=1&signature=abc",
                key=None,
            )
            await request(
                Row("no-such-model", 404, "model_not_found", ("NOT_FOUND", "MODEL_NOT_FOUND")),
                "GET",
                front + "/v1/models/nope",
            )
            await request(Row("models", 200, None, ("OK", None)), "GET", front + "/v1/models")
            await request(Row("unknown-url", 404, "unknown_url", None), "GET", front + "/v1/nope")
            await request(Row("method", 405, "method_not_allowed", None), "GET", front + gen)
            await request(
                Row("too-large", 413, "request_too_large", None),
                "POST",
                front + gen,
                body=b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}',
            )
            fake.inject(Fault.SERVER_ERROR, Fault.SERVER_ERROR)
            await request(
                Row("upstream", 502, "upstream_error", ("UNAVAILABLE", "UPSTREAM_ERROR")),
                "POST",
                front + gen,
                json_body=body,
            )
            await asyncio.sleep(0.35)  # past the breaker's cooldown (FAST_DISPATCH)
            await request(
                Row("service-down", 503, "service_unavailable", None),
                "POST",
                down_url + gen,
                json_body=body,
            )
            fake.inject(Fault.STALL)
            await request(
                Row(
                    "deadline",
                    504,
                    "timeout",
                    ("DEADLINE_EXCEEDED", None),
                    # The dispatcher ends at the caller's deadline too: when it sees the
                    # deadline pass before gRPC does, it says so with its own reason.
                    alternative=("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"),
                ),
                "POST",
                hasty_url + gen,
                json_body=body,
            )

            # The service logs a call its caller gave up on once it has released it.
            async def logged() -> bool:
                return bool(capture.objects("imagegate.request", "log-deadline"))

            await poll(logged, timeout_s=10)
    finally:
        await down.cleanup()
        await hasty.cleanup()

    for rid, (row, reply) in sent.items():
        assert reply.headers["x-request-id"] == rid
        [front_line] = capture.objects("imagegate.access", rid)
        assert set(front_line) >= FRONT_FIELDS, (rid, front_line)
        assert (front_line["status"], front_line["code"]) == (row.status, row.code), rid
        assert front_line["level"] == "info" and front_line["total_ms"] >= 0
        service_lines = capture.objects("imagegate.request", rid)
        if row.grpc is None:
            assert service_lines == [], rid
            continue
        [line] = service_lines
        assert set(line) >= SERVICE_FIELDS, (rid, line)
        assert (line["status"], line["reason"]) in (row.grpc, row.alternative), (rid, line)
    # What the service knew about the generations it saw.
    ok_line = capture.objects("imagegate.request", "log-ok")[0]
    assert ok_line["key_id"] == rich.key_id and ok_line["account"] == rich.account
    assert (ok_line["model"], ok_line["n"], ok_line["size"], ok_line["quality"]) == (
        "flux", 1, "1024x1024", "standard",
    )  # fmt: skip
    assert ok_line["route"] == "compat/flux-schnell" and ok_line["cost_micros"] == UNIT_PRICE
    assert ok_line["upstream_ms"] > 0 and ok_line["total_ms"] >= ok_line["upstream_ms"]
    poor_line = capture.objects("imagegate.request", "log-poor")[0]
    assert (poor_line["account"], poor_line["model"], poor_line["cost_micros"]) == (
        poor.account, "flux", None,
    )  # fmt: skip
    assert capture.objects("imagegate.request", "log-bad-key")[0]["key_id"] is None

    # Nothing secret, anywhere, at any level; the prompt only at debug.
    everything = "\n".join(line for _, line in capture.lines)
    for secret in (rich.key, poor.key, limited.key, once, unknown_key, UPSTREAM_KEY):
        assert secret not in everything
    image = base64.b64encode(image_bytes(seed=0)).decode()
    assert image[:60] not in everything
    assert not BASE64_RUN.search(everything)
    assert PROMPT in everything  # at debug: the check below is not vacuous
    for level, line in capture.lines:
        if level >= logging.INFO:
            assert PROMPT not in line, line


async def test_a_streamed_generation_is_one_line_per_process_too(lstack: Stack) -> None:
    tenant = await make_tenant(lstack.service)
    with captured() as capture:
        reply = await call(
            "POST",
            lstack.fronts["aiohttp"] + "/v1/images/generations",
            key=tenant.key,
            json_body={
                "model": "local",
                "prompt": PROMPT,
                "size": "256x256",
                "n": 2,
                "stream": True,
                "partial_images": 1,
            },
            headers={"x-request-id": "log-stream"},
        )
    assert reply.status == 200 and reply.body.count(b"event: image_generation.completed") == 2
    [front] = capture.objects("imagegate.access", "log-stream")
    assert (front["status"], front["code"]) == (200, None)
    [line] = capture.objects("imagegate.request", "log-stream")
    assert (line["rpc"], line["status"], line["model"], line["n"], line["images"]) == (
        "StreamImages", "OK", "local", 2, 2,
    )  # fmt: skip
    assert line["cost_micros"] == 2 * 1000 and line["account"] == tenant.account
    everything = "\n".join(text for level, text in capture.lines if level >= logging.INFO)
    assert PROMPT not in everything and not BASE64_RUN.search(everything)


def test_text_format_for_a_terminal_keeps_the_fields() -> None:
    record = logging.LogRecord("imagegate.request", logging.INFO, "", 0, "%s %s", ("A", "OK"), None)
    record.fields = {"request_id": "r1", "model": "flux", "reason": None}
    text = TextFormatter().format(record)
    assert text.endswith("INFO imagegate.request A OK request_id=r1 model=flux")
    line = json.loads(JsonFormatter().format(record))
    assert (line["message"], line["request_id"], line["reason"]) == ("A OK", "r1", None)
