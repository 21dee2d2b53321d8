"""The image backend interface: named blobs written, read, deleted and swept by age."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

# The names ImageStore makes (URL-safe random id, one of its extensions): a sweep
# deletes nothing else, whatever else shares the folder or bucket prefix.
IMAGE_NAME = re.compile(r"[A-Za-z0-9_-]{16,128}\.(?:png|jpeg|webp)")


class ImageBackend(Protocol):
    """Bytes by name. Every method is async and keeps blocking I/O off the loop."""

    async def write(self, name: str, data: bytes, content_type: str) -> None:
        """Store the whole image under `name`; a reader never sees part of it."""

    async def read(self, name: str) -> bytes | None:
        """The bytes stored under `name`, or None when there are none."""

    async def delete(self, names: Sequence[str]) -> None:
        """Delete these images; names not (or no longer) there are no error."""

    async def delete_older_than(self, cutoff: float) -> int:
        """Delete every image written before `cutoff` (Unix time); how many were deleted."""

    async def aclose(self) -> None:
        """Release connections; the backend is not used afterwards."""
