"""Where image bytes live: a local folder (the embedded default) or an S3-compatible bucket."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from service.imagestore.base import ImageBackend
from service.imagestore.local import LocalFiles

S3_SCHEME = "s3://"


def is_s3(location: str) -> bool:
    return location.startswith(S3_SCHEME)


async def open_backend(location: str, default_root: Path, env: Mapping[str, str]) -> ImageBackend:
    """The backend `location` names (IMAGEGATE_IMAGE_STORE): empty means files under
    `default_root`; `s3://bucket/prefix` a bucket, its client built from the AWS
    variables of `env` (botocore is imported only then)."""
    if not location:
        return LocalFiles(default_root)
    if is_s3(location):
        from service.imagestore.s3 import S3Objects

        return await S3Objects.open(location, env)
    # Only the scheme: the rest is the user's, and may one day hold more than a path.
    raise ValueError(
        f"unsupported image store {location.split(':', 1)[0]!r}: "
        "leave IMAGEGATE_IMAGE_STORE empty (files in the data dir) or use s3://BUCKET/PREFIX"
    )
