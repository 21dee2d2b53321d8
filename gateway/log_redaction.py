"""Keys never reach a log: records of aiohttp's loggers (and the front's) are redacted.

aiohttp's own messages may quote a raw request line or header, Authorization
included (a malformed header is quoted in the parser's error). The filter
renders each record, traceback included, and masks anything key-like.
"""

from __future__ import annotations

import logging
import re

# Our keys, and any bearer or basic credential, whatever it looks like.
_SECRET_RE = re.compile(r"\bsk-[A-Za-z0-9_\-]{4,}|(?i:\b((?:bearer|basic)\s+))\S+")
LOGGERS = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
    "asyncio",
    "imagegate.access",
    "imagegate.gateway",
)


def redact(text: str) -> str:
    return _SECRET_RE.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        elif record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        record.msg, record.args = redact(text), None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        # Structured fields (the JSON log lines' extra={"fields": ...}), a path among them.
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


_FILTER = RedactSecrets()


def install() -> None:
    """Attach the filter to every logger that may see a request (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
