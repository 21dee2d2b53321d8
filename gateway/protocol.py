"""The HTTP server under the app: limits, timeouts, and the table's errors for what it refuses.

This is the layer Envoy's HTTP connection manager is in the other front: it
refuses what cannot be read as a request before any route or middleware runs.
aiohttp's parser answers a malformed request (bad request line, header or
framing, a line over its limit) itself, with a plain-text 400 that quotes the
offending bytes. aiohttp has no public hook for that answer:
RequestHandler.handle_error writes it and web.Server makes one RequestHandler
per connection, so the runner swaps in subclasses of both; it also puts a
front door before the app for the checks Envoy makes that aiohttp does not
(tests/test_http_edge.py pins all of it, on both fronts).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_request import BaseRequest

from gateway import errors, http_input
from gateway.config import GatewayConfig

log = logging.getLogger("imagegate.gateway")

# As Envoy's HTTP/1 codec: at most 100 headers (max_headers_count), and 431 beyond.
MAX_HEADERS = 100
# aiohttp's wording for "more than max_headers" (a BadHttpMessage like every parse error).
_TOO_MANY_HEADERS = "Too many headers received"


def error_row(status: int, exc: BaseException | None) -> errors.Row:
    """The table row for a request the HTTP layer refused, or a failure outside the app."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS
    ):
        return errors.HEADERS_TOO_LARGE
    if status >= 500:
        return errors.INTERNAL
    return errors.MALFORMED


class _RequestHandler(web.RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        row = error_row(status, exc)
        if row is errors.INTERNAL:
            log.error("request failed outside the app: %s", type(exc).__name__)
        else:
            # The parser's message quotes the raw line, which may hold a key: not logged.
            log.debug("refused a malformed request: %s", type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed instead")
        return refusal(row, str(uuid.uuid4()))


def refusal(row: errors.Row, request_id: str) -> web.Response:
    """An error of the HTTP layer; the connection is closed after it, as Envoy does."""
    response = web.Response(
        status=row.status,
        body=errors.error_body(row),
        headers={"Content-Type": "application/json", "x-request-id": request_id},
    )
    response.force_close()
    return response


RawHandler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]


def front_door(app_handler: RawHandler, config: GatewayConfig) -> RawHandler:
    """What Envoy's connection manager refuses or ignores before its filters run."""

    async def handle(request: BaseRequest) -> web.StreamResponse:
        if (
            http_input.header_bytes(request.method, request.raw_path, request.raw_headers)
            > config.max_header_bytes
        ):
            row = errors.HEADERS_TOO_LARGE
        elif (
            not http_input.method_ok(request.method, request.raw_path)
            or not http_input.target_ok(request.raw_path)
            or not http_input.host_ok(request.headers.get(hdrs.HOST))
        ):
            row = errors.MALFORMED
        elif http_input.is_upgrade(request.headers):
            row = errors.MALFORMED  # Envoy serves no upgrade and refuses them (403)
        else:
            return await app_handler(request)
        request_id = http_input.request_id(request.headers)
        log.info("%s refused %d request_id=%s", request.method, row.status, request_id)
        return refusal(row, request_id)

    return handle


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections answer like Envoy's HTTP layer, in the table's rows."""

    def __init__(self, app: web.Application, config: GatewayConfig, **kwargs: object) -> None:
        super().__init__(app, **kwargs)  # type: ignore[arg-type]
        self._config = config

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The Server aiohttp configured, with our handler class and front door.
        server.__class__ = _Server
        server.request_handler = front_door(server.request_handler, self._config)
        return server


def make_runner(app: web.Application, config: GatewayConfig) -> GatewayRunner:
    return GatewayRunner(
        app,
        config,
        # The front logs each request itself, without query strings (they carry signatures).
        access_log=None,
        # A client that hangs up cancels the gRPC call, so the service releases
        # its reservation instead of charging for unseen images.
        handler_cancellation=True,
        # Idle connections, and connections that do not deliver a request's
        # headers in time, are closed (aiohttp times both from the same moment).
        keepalive_timeout=config.header_timeout_s,
        # After an early answer (408, 413), the rest of a body is read and dropped
        # for at most a second before the connection closes, as Envoy's delayed close.
        lingering_time=1.0,
        max_line_size=config.max_header_bytes,
        max_field_size=config.max_header_bytes,
        max_headers=MAX_HEADERS,
        # Request bodies are never decoded: an encoded one is refused (as by Envoy's Lua).
        auto_decompress=False,
    )
