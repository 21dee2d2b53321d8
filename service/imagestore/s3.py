"""Images as objects in an S3-compatible bucket, shared by every replica.

`IMAGEGATE_IMAGE_STORE=s3://BUCKET/PREFIX`. The client is botocore's (the `s3`
extra), built from the standard AWS variables: AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL (MinIO, Ceph, R2, ...; path-style addressing then), AWS_REGION
or AWS_DEFAULT_REGION, and credentials from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) or, when the environment is the
process's own, the rest of botocore's chain (profiles, SSO, container and
instance roles). botocore is synchronous: every call runs in a thread.

The objects stay private: imagegate reads them and serves them behind its own
signed links, so the bucket needs no public access and no presigned URLs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from service.imagestore.base import IMAGE_NAME

log = logging.getLogger("imagegate.imagestore")
# DeleteObjects takes at most this many keys per request.
_DELETE_BATCH = 1000


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix ending in '/' or empty) of s3://BUCKET[/PREFIX]."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"image store {url!r}: expected s3://BUCKET or s3://BUCKET/PREFIX")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


class S3Objects:
    """One botocore S3 client (thread-safe, pooled connections) for the process."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"S3Objects(s3://{self.bucket}/{self.prefix})"

    @classmethod
    async def open(cls, url: str, env: Mapping[str, str]) -> S3Objects:
        """Build the client and check that the bucket answers: a wrong endpoint, bucket
        or credential stops the start, rather than every image request later."""
        bucket, prefix = parse_url(url)
        try:
            import botocore  # noqa: F401
        except ImportError:
            raise ValueError(
                "IMAGEGATE_IMAGE_STORE is s3://... but botocore is not installed "
                "(pip install 'imagegate[s3]')"
            ) from None
        # Loading botocore's service model reads files; credentials may ask the network.
        client = await asyncio.to_thread(_client, env)
        store = cls(client, bucket, prefix)
        try:
            await asyncio.to_thread(client.head_bucket, Bucket=bucket)
        except Exception as exc:
            await store.aclose()
            raise ValueError(
                f"image store s3://{bucket}: the bucket does not answer: {exc}"
            ) from exc
        return store

    def _key(self, name: str) -> str:
        return self.prefix + name

    async def write(self, name: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self._write, name, data, content_type)

    def _write(self, name: str, data: bytes, content_type: str) -> None:
        # One PutObject is atomic: readers see the whole object or none.
        self._client.put_object(
            Bucket=self.bucket, Key=self._key(name), Body=data, ContentType=content_type
        )

    async def read(self, name: str) -> bytes | None:
        return await asyncio.to_thread(self._read, name)

    def _read(self, name: str) -> bytes | None:
        try:
            reply = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
        except self._client.exceptions.NoSuchKey:
            return None
        with reply["Body"] as body:
            data: bytes = body.read()
        return data

    async def delete(self, names: Sequence[str]) -> None:
        if names:
            await asyncio.to_thread(self._delete_keys, [self._key(n) for n in names])

    def _delete_keys(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            reply = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            # A missing key is no error; anything else reported is.
            failed = [e for e in reply.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if failed:
                first = failed[0]
                raise OSError(
                    f"S3 DeleteObjects failed for {len(failed)} of {len(batch)} objects "
                    f"({first.get('Code')}: {first.get('Message')})"
                )

    async def delete_older_than(self, cutoff: float) -> int:
        return await asyncio.to_thread(self._sweep, cutoff)

    def _sweep(self, cutoff: float) -> int:
        # LastModified is the server's clock: replicas and store should keep time (NTP).
        old = []
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for item in page.get("Contents", ()):
                name = item["Key"][len(self.prefix) :]
                if IMAGE_NAME.fullmatch(name) and item["LastModified"].timestamp() < cutoff:
                    old.append(item["Key"])
        self._delete_keys(old)
        return len(old)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.close)


def _client(env: Mapping[str, str]) -> Any:
    import botocore.config
    import botocore.session

    from service.awslog import quiet_signing_log

    quiet_signing_log()
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    session = botocore.session.get_session()
    # Only the environment we were given, unless it is the process's own: then the
    # whole chain (and its refreshing temporary credentials) as boto3 would use it.
    if env is not os.environ:
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not (key and secret):
            raise ValueError(
                "IMAGEGATE_IMAGE_STORE is s3://... but AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY are not set"
            )
        session.set_credentials(key, secret, env.get("AWS_SESSION_TOKEN") or None)
    config = botocore.config.Config(
        # Other S3 implementations are mostly reached by path, not by bucket host name.
        s3={"addressing_style": "path" if endpoint else "auto"},
        # Checksums only where S3 requires them: newer defaults break some servers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
    )
    return session.create_client("s3", region_name=region, endpoint_url=endpoint, config=config)
