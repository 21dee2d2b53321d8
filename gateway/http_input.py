"""Client headers and request targets, judged exactly as the Envoy front judges them.

Envoy's HTTP layer and Lua filter refuse or rewrite some inputs before the
transcoder; this module gives the aiohttp front the same rules, so both fronts
answer every request alike (docs/envoy.md lists what was measured).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from urllib.parse import unquote_to_bytes

from multidict import CIMultiDictProxy

# Request ids that may be logged, stored and echoed as they are; anything else
# is replaced by a generated one (the Lua filter and the service do the same).
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Envoy's authority check (nghttp2's): a Host with any other character is refused.
_HOST_RE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@\[\]%]*")
# gRPC metadata values are printable ASCII; any other byte reaches the service
# as '?', from both fronts (grpc refuses to send the others at all).
_PRINTABLE = bytes(b if 0x20 <= b <= 0x7E else ord("?") for b in range(256))
_IDENTITY = {"", "identity"}
# Measured by sending every method llhttp knows to both fronts.
_ENVOY_REFUSES = frozenset({"M-SEARCH", "QUERY"})


def request_id(headers: CIMultiDictProxy[str]) -> str:
    """The client's x-request-id when it is safe, else a new UUID."""
    # Several headers are joined with ',' (Envoy's Lua sees them so): never safe.
    sent = ",".join(headers.getall("x-request-id", ()))
    return sent if REQUEST_ID_RE.fullmatch(sent) else str(uuid.uuid4())


def metadata_value(raw_headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A header as gRPC metadata: values joined with ",", bytes gRPC cannot carry as "?"."""
    values = [value for key, value in raw_headers if key.lower() == name]
    if not values:
        return None
    return b",".join(values).translate(_PRINTABLE).decode("ascii")


def host_ok(host: str | None) -> bool:
    """False for a request Envoy refuses before routing: no Host, or one it cannot parse."""
    return host is not None and _HOST_RE.fullmatch(host) is not None


def method_ok(method: str, raw_target: str) -> bool:
    """Methods aiohttp's parser takes but Envoy's refuses; CONNECT takes no path."""
    return method not in _ENVOY_REFUSES and not (method == "CONNECT" and raw_target[:1] == "/")


def path_param(raw: str) -> str:
    """A path variable as Envoy's transcoder decodes it, after the Lua filter's rule.

    The transcoder decodes every escape, reserved characters included (%2F is
    '/', measured); a segment that would decode to invalid UTF-8 reaches it
    with its '%' escaped by the Lua filter, that is, as its literal text.
    """
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return raw


def query_value(raw_query: str, name: str) -> str:
    """The last value of a query parameter, as the transcoder binds it after the Lua filter.

    '+' is a space and escapes are decoded; a value that decodes to invalid
    UTF-8 is empty (the Lua filter empties it: the transcoder would pass the
    bytes on, and the service could not decode the request).
    """
    value = ""
    for pair in raw_query.split("&"):
        key, _, raw = pair.partition("=")
        if pair and _unquote_plus(key) == name:
            value = _unquote_plus(raw)
    return value


def _unquote_plus(text: str) -> str:
    try:
        return unquote_to_bytes(text.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        return ""


def target_ok(raw_target: str) -> bool:
    """Envoy refuses a target with a fragment, or one that is not a path (OPTIONS *)."""
    return "#" not in raw_target and not raw_target.startswith("*")


def is_upgrade(headers: CIMultiDictProxy[str]) -> bool:
    """An Upgrade Envoy refuses (it serves none, and drops only h2c's itself)."""
    connection = {
        token.strip().lower() for token in ",".join(headers.getall("Connection", ())).split(",")
    }
    upgrade = headers.get("Upgrade")
    return "upgrade" in connection and upgrade is not None and upgrade.strip().lower() != "h2c"


def header_bytes(method: str, raw_target: str, raw_headers: Iterable[tuple[bytes, bytes]]) -> int:
    """What Envoy's max_request_headers_kb counts: request line, header names and values."""
    return len(method) + len(raw_target) + sum(len(k) + len(v) for k, v in raw_headers)


def body_encoded(headers: CIMultiDictProxy[str]) -> bool:
    """A Content-Encoding other than identity: neither front decodes request bodies."""
    codings = ",".join(headers.getall("Content-Encoding", ())).split(",")
    return any(coding.strip(" \t").lower() not in _IDENTITY for coding in codings)
