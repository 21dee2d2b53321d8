"""Images as files in one private folder (the embedded default)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from service.private import create_private, private_dir


class LocalFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"LocalFiles({str(self.root)!r})"

    async def write(self, name: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self._write, name, data, content_type)

    def _write(self, name: str, data: bytes, content_type: str) -> None:
        private_dir(self.root)
        tmp = self.root / f".{name}.tmp"
        fd = create_private(tmp)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            # Rename so a concurrent GET never sees a half-written file.
            tmp.replace(self.root / name)
        except BaseException:
            # A full disk leaves a partial file: delete it, which also frees the
            # space the database needs to give the reservation back.
            tmp.unlink(missing_ok=True)
            raise

    async def read(self, name: str) -> bytes | None:
        try:
            return await asyncio.to_thread((self.root / name).read_bytes)
        except FileNotFoundError:
            return None

    async def delete(self, names: Sequence[str]) -> None:
        await asyncio.to_thread(self._delete, names)

    def _delete(self, names: Sequence[str]) -> None:
        for name in names:
            (self.root / name).unlink(missing_ok=True)

    async def delete_older_than(self, cutoff: float) -> int:
        return await asyncio.to_thread(self._sweep, cutoff)

    def _sweep(self, cutoff: float) -> int:
        removed = 0
        if not self.root.is_dir():
            return 0
        for entry in os.scandir(self.root):
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed

    async def aclose(self) -> None:
        """Nothing held between calls."""
