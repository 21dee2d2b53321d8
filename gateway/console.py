"""The web console: static files under /console/, a session cookie, and /console/api/
calling the front's own REST handlers with the session's key.

The key lives in one place in the browser: an HttpOnly, SameSite=Strict cookie
scoped to /console (Secure under TLS), so no script can read it and it never
appears in a URL. Every state change must carry the console's header and come
from this origin (CSRF, docs in README "Web console"); the Content-Security-Policy
allows only this origin's scripts and styles, none inline.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
import mimetypes
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web
from yarl import URL

from gateway import errors, json_text

PREFIX = "/console"
API_PREFIX = "/console/api/"
COOKIE = "imagegate_console"
CONSOLE_HEADER = "X-Imagegate-Console"
ADMIN_KEY_PREFIX = "sk-admin-"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# Request headers never passed on to the handlers behind /console/api/: the cookie (the
# key is sent as Authorization instead) and any Authorization the page might send.
_DROPPED = frozenset({"cookie", "authorization"})
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_SESSION_BODY_MAX = 4096
_KEY_MAX = 256

CSRF_FAILED = errors.Row(
    403,
    "invalid_request_error",
    "csrf_failed",
    "The console refused this request: it must come from the console's own page.",
)
NO_SESSION = errors.Row(
    401, "invalid_request_error", "invalid_api_key", "Sign in to the console with an API key."
)

# The front's own handling of a request (route check, handler, error table),
# given by gateway/app.py so this module needs none of its internals.
FrontCall = Callable[[web.Request], Awaitable[web.StreamResponse]]
FRONT: web.AppKey[FrontCall] = web.AppKey("console_front")
TRUSTED: web.AppKey[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]] = web.AppKey(
    "console_trusted"
)
STATIC: web.AppKey[dict[str, tuple[bytes, str]]] = web.AppKey("console_static")
# Marks the clones sent to the front's handlers: their responses (an event stream is
# prepared on the clone) get the console's headers too.
PROXIED: web.RequestKey[bool] = web.RequestKey("console_proxied")


def add_routes(app: web.Application, front: FrontCall, trusted_proxies: str) -> None:
    """The console's routes (before the front's catch-all) and its response headers."""
    app[FRONT] = front
    app[TRUSTED] = _networks(trusted_proxies)
    app[STATIC] = _load_static()
    route = app.router.add_route
    route("GET", PREFIX, _to_index)
    route("*", PREFIX + "/session", _session)
    route("*", API_PREFIX + "{tail:.*}", _api)
    route("GET", PREFIX + "/", _index)
    route("GET", PREFIX + "/static/{name}", _static)
    route("*", PREFIX + "/{tail:.*}", _not_found)
    app.on_response_prepare.append(_security_headers)


def is_console(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _load_static() -> dict[str, tuple[bytes, str]]:
    """The app's files, read once at start (a few small files): no file I/O per request."""
    folder = importlib.resources.files("gateway").joinpath("console", "static")
    files = {}
    for entry in folder.iterdir():
        if entry.is_file():
            kind = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if entry.name.endswith(".js"):
                kind = "text/javascript"
            if kind.startswith("text/"):
                kind += "; charset=utf-8"
            files[entry.name] = (entry.read_bytes(), kind)
    return files


def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(
        ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip()
    )


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if is_console(request.rel_url.raw_path) or request.get(PROXIED):
        response.headers.update(HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")


# --- pages ------------------------------------------------------------------------


async def _to_index(request: web.Request) -> web.Response:
    return web.Response(status=301, headers={"Location": PREFIX + "/"})


async def _index(request: web.Request) -> web.Response:
    return _file(request, "index.html")


async def _static(request: web.Request) -> web.Response:
    return _file(request, request.match_info["name"])


def _file(request: web.Request, name: str) -> web.Response:
    found = request.app[STATIC].get(name)
    if found is None:
        return _error(errors.UNKNOWN_URL, errors.unknown_url_message(request.method, request.path))
    body, kind = found
    # Revalidated each time: a new release's files are never mixed with an old page.
    return web.Response(body=body, headers={"Content-Type": kind, "Cache-Control": "no-cache"})


async def _not_found(request: web.Request) -> web.Response:
    return _error(
        errors.UNKNOWN_URL, errors.unknown_url_message(request.method, request.rel_url.raw_path)
    )


# --- the session ------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    role: str  # "admin" or "account"
    account: str | None

    def json(self) -> dict[str, str | None]:
        return {"role": self.role, "account": self.account}


async def _session(request: web.Request) -> web.StreamResponse:
    if request.method == "GET":
        key = request.cookies.get(COOKIE, "")
        session = await _validate(request, key) if key else None
        return _json(session.json()) if session else _error(NO_SESSION)
    if request.method == "POST":
        if not _csrf_ok(request):
            return _error(CSRF_FAILED)
        key = await _key_from_body(request)
        session = await _validate(request, key) if key else None
        if session is None:
            return _error(NO_SESSION, "The key was not accepted.")
        response = _json(session.json())
        response.set_cookie(
            COOKIE,
            key,
            path=PREFIX,
            httponly=True,
            samesite="Strict",
            secure=_over_tls(request),
        )
        return response
    if request.method == "DELETE":
        if not _csrf_ok(request):
            return _error(CSRF_FAILED)
        response = _json({"role": None, "account": None})
        response.del_cookie(COOKIE, path=PREFIX, samesite="Strict")
        return response
    return _error(
        errors.WRONG_METHOD,
        errors.wrong_method_message(request.method, request.rel_url.raw_path),
        {"Allow": "GET, POST, DELETE"},
    )


async def _key_from_body(request: web.Request) -> str:
    """The key of `{"key": "sk-..."}`; "" for anything else (refused as an unknown key).

    Read from the stream, not request.read(), so that the request can still be
    cloned for the front's handlers."""
    body = b""
    while chunk := await request.content.read(1024):
        body += chunk
        if len(body) > _SESSION_BODY_MAX:
            return ""
    try:
        key = json.loads(body).get("key")
    except (ValueError, AttributeError):
        return ""
    ok = isinstance(key, str) and 0 < len(key) <= _KEY_MAX and key.isascii() and key.isprintable()
    return key if ok and " " not in key else ""


async def _validate(request: web.Request, key: str) -> Session | None:
    """Which kind of key this is, by asking the front's own routes with it."""
    if key.startswith(ADMIN_KEY_PREFIX):
        status, _ = await _call(request, "GET", "/admin/v1/models", key)
        return Session("admin", None) if status == 200 else None
    status, _ = await _call(request, "GET", "/v1/balance", key)
    if status != 200:
        return None
    # The account's name, from its keys (the route may be absent on an older service).
    status, body = await _call(request, "GET", "/v1/keys", key)
    account = None
    if status == 200:
        try:
            account = next(
                (k["account"] for k in json.loads(body)["data"] if k.get("account")), None
            )
        except (ValueError, KeyError, TypeError):
            account = None
    return Session("account", account)


async def _call(request: web.Request, method: str, path: str, key: str) -> tuple[int, bytes]:
    clone = request.clone(
        method=method, rel_url=URL(path, encoded=True), headers=_headers(request, key)
    )
    clone[PROXIED] = True
    response = await request.app[FRONT](clone)
    body = getattr(response, "body", None)
    return response.status, body if isinstance(body, bytes) else b""


# --- /console/api/ ----------------------------------------------------------------


async def _api(request: web.Request) -> web.StreamResponse:
    if request.method not in _SAFE_METHODS and not _csrf_ok(request):
        return _error(CSRF_FAILED)
    key = request.cookies.get(COOKIE, "")
    if not key:
        return _error(NO_SESSION)
    raw = request.rel_url.raw_path[len(API_PREFIX) - 1 :]
    query = request.rel_url.raw_query_string
    target = URL(raw + ("?" + query if query else ""), encoded=True)
    clone = request.clone(rel_url=target, headers=_headers(request, key))
    clone[PROXIED] = True
    return await request.app[FRONT](clone)


def _headers(request: web.Request, key: str) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED}
    headers["Authorization"] = f"Bearer {key}"
    return headers


# --- CSRF -------------------------------------------------------------------------


def _csrf_ok(request: web.Request) -> bool:
    """A state change from the console's own page: its header (which a cross-site form
    cannot send, and a cross-site fetch cannot without a CORS preflight we never allow),
    Origin (when sent) this server's own, Sec-Fetch-Site (when sent) same-origin."""
    if request.headers.get(CONSOLE_HEADER) != "1":
        return False
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    schemes = {"https"} if _over_tls(request) else {request.scheme}
    return parts.scheme in schemes and parts.netloc.lower() == request.host.lower()


def _over_tls(request: web.Request) -> bool:
    """This connection's scheme, or a trusted proxy's X-Forwarded-Proto."""
    if request.secure:
        return True
    peer = request.remote
    try:
        address = ipaddress.ip_address(peer) if peer else None
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    trusted = address is not None and any(address in net for net in request.app[TRUSTED])
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
    return trusted and forwarded == "https"


def _json(value: object) -> web.Response:
    return web.Response(body=json_text.dumps(value), content_type="application/json")


def _error(
    row: errors.Row, message: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=row.status,
        body=errors.error_body(row, message),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
