"""API keys: generation, hashing at rest, and parsing the Authorization header."""

from __future__ import annotations

import hashlib
import re
import secrets

from service.errors import InvalidApiKey

PREFIX = "sk-"
# 32 random bytes, URL-safe base64 without padding: 256 bits, 43 characters.
_KEY_RE = re.compile(r"sk-[A-Za-z0-9_-]{43}")

MISSING = (
    "You didn't provide an API key. Provide it in the Authorization header "
    "using Bearer auth (Authorization: Bearer YOUR_KEY)."
)
INVALID = (
    "Incorrect API key provided. Check the key, or create a new one with `imagegate keys create`."
)


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def display_prefix(key: str, head: int = 7) -> str:
    """What `keys list` shows: enough to recognise a key, useless to an attacker."""
    return key[:head] + "..." + key[-4:]


def bearer_token(value: str | None) -> str:
    """The token in `Authorization: Bearer ...`, or InvalidApiKey. Never echoes it."""
    if not value:
        raise InvalidApiKey(MISSING)
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidApiKey(MISSING)
    return token


def key_from_authorization(value: str | None) -> str:
    """The API key in `Authorization: Bearer sk-...`, or InvalidApiKey. An admin key
    (sk-admin-...) is not one: it cannot spend."""
    token = bearer_token(value)
    if not _KEY_RE.fullmatch(token):
        raise InvalidApiKey(INVALID)
    return token
