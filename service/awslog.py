"""botocore's logging made safe for ours: shared by the Bedrock adapter and the S3 image store."""

from __future__ import annotations

import logging


class NoSigningDebug(logging.Filter):
    """botocore's signer logs the canonical request, session token included, at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


def quiet_signing_log() -> None:
    logger = logging.getLogger("botocore.auth")
    if not any(isinstance(f, NoSigningDebug) for f in logger.filters):
        logger.addFilter(NoSigningDebug())
