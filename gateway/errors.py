"""The front's one error table: gRPC status (+ ErrorInfo) or front condition -> OpenAI error.

Envoy's Lua filter (inline in envoy.yaml) mirrors this table; the contract
tests run both fronts with the same expectations, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from gateway import json_text


@dataclass(frozen=True)
class Row:
    status: int
    type: str
    code: str | None
    # Used when the service gave no message of its own (front errors, or a
    # gRPC status without an imagegate reason, whose text we must not leak).
    message: str = ""


# ErrorInfo.reason (domain "imagegate") -> HTTP.
BY_REASON: dict[str, Row] = {
    "INVALID_PARAMETER": Row(400, "invalid_request_error", "invalid_value"),
    "MODEL_NOT_SUPPORTED": Row(400, "invalid_request_error", "model_not_found"),
    # An upload body the service could not read; the service names the code
    # (invalid_multipart or invalid_json).
    "INVALID_BODY": Row(400, "invalid_request_error", "invalid_multipart"),
    # An input image over its size cap (the front's own 413 covers the whole body).
    "UPLOAD_TOO_LARGE": Row(413, "invalid_request_error", "request_too_large"),
    "CONTENT_POLICY": Row(400, "invalid_request_error", "content_policy_violation"),
    "INVALID_API_KEY": Row(401, "invalid_request_error", "invalid_api_key"),
    "MODEL_NOT_ALLOWED": Row(403, "invalid_request_error", "model_not_allowed"),
    "INSUFFICIENT_BALANCE": Row(402, "insufficient_quota", "insufficient_quota"),
    "IDEMPOTENCY_CONFLICT": Row(409, "invalid_request_error", "idempotency_key_conflict"),
    "RATE_LIMITED": Row(429, "requests", "rate_limit_exceeded"),
    "UPSTREAM_ERROR": Row(502, "upstream_error", "upstream_error"),
    "DEADLINE_EXCEEDED": Row(504, "server_error", "timeout"),
    "IMAGE_NOT_FOUND": Row(404, "invalid_request_error", "image_not_found"),
    "MODEL_NOT_FOUND": Row(404, "invalid_request_error", "model_not_found"),
    # The admin API: an account's key where an admin key is needed, and what it manages.
    "ADMIN_REQUIRED": Row(403, "invalid_request_error", "admin_required"),
    "ACCOUNT_NOT_FOUND": Row(404, "invalid_request_error", "account_not_found"),
    "ACCOUNT_EXISTS": Row(409, "invalid_request_error", "account_exists"),
    "KEY_NOT_FOUND": Row(404, "invalid_request_error", "key_not_found"),
}

# gRPC status without an imagegate reason -> HTTP, with a fixed message.
DEADLINE = Row(
    504, "server_error", "timeout", "The request timed out before the images were ready."
)
UNAVAILABLE = Row(
    503,
    "server_error",
    "service_unavailable",
    "The image service is unavailable right now. Please retry shortly.",
)
INTERNAL = Row(500, "server_error", None, "The server had an error while processing your request.")
BY_CODE: dict[grpc.StatusCode, Row] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: DEADLINE,
    grpc.StatusCode.UNAVAILABLE: UNAVAILABLE,
}

# Conditions the front detects itself.
INVALID_JSON = Row(
    400,
    "invalid_request_error",
    "invalid_json",
    "We could not parse the JSON body of your request. Send a JSON object with this "
    "endpoint's parameters and the header Content-Type: application/json.",
)
TOO_LARGE = Row(413, "invalid_request_error", "request_too_large", "The request body is too large.")
# An upload (edits, variations) with a Content-Encoding: read by neither front.
ENCODED_UPLOAD = Row(
    400,
    "invalid_request_error",
    "invalid_multipart",
    "We could not read the body of your request: send it without a Content-Encoding.",
)
UNKNOWN_URL = Row(404, "invalid_request_error", "unknown_url")
WRONG_METHOD = Row(405, "invalid_request_error", "method_not_allowed")
# Requests the HTTP layer refuses before any route: a bad request line, header
# or framing (both fronts' parsers refuse the same inputs, see docs/envoy.md).
MALFORMED = Row(
    400,
    "invalid_request_error",
    "malformed_request",
    "The server could not read this HTTP request: check its request line, headers and framing.",
)
HEADERS_TOO_LARGE = Row(
    431,
    "invalid_request_error",
    "request_headers_too_large",
    "The request line or headers are too large.",
)
# The client stopped sending its request (headers or body) before the read timeout.
REQUEST_TIMEOUT = Row(
    408, "invalid_request_error", "request_timeout", "The request was not received in time."
)


def unknown_url_message(method: str, path: str) -> str:
    return f"Invalid URL ({method} {path})"


def wrong_method_message(method: str, path: str) -> str:
    return f"Method not allowed ({method} {path})"


def error_body(
    row: Row, message: str | None = None, param: str | None = None, code: str | None = None
) -> bytes:
    """Serialise exactly as Envoy's Lua filter does: compact, fixed key order, same escapes."""
    return json_text.dumps({"error": error_object(row, message, param, code)})


def error_object(
    row: Row, message: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, str | None]:
    """OpenAI's error object: all four keys, in this order."""
    return {
        "message": message if message is not None else row.message,
        "type": row.type,
        "param": param,
        "code": code if code is not None else row.code,
    }
