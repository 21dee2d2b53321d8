"""asyncio helpers the domain shares: work that a cancellation must not cut short,
and work that goes to a thread only when it is big enough to stall the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
# Parsing or encoding this many bytes takes tens of microseconds: less than the hop
# to a thread and back costs (about 100 us of CPU), so it runs on the loop.
INLINE_BYTES = 64 * 1024


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread when it works on more than INLINE_BYTES, else right here."""
    if size <= INLINE_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def uninterrupted(work: Awaitable[T]) -> T:
    """Run `work` to its end even if the caller is cancelled meanwhile, then pass the
    cancellation on: money and leases are resolved before a cancelled request ends."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                cancelled = True
                continue
        except Exception:
            pass  # task.result() below raises it
        break
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation wins
        raise asyncio.CancelledError
    return task.result()


def loop_factory(uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when asked for and installed (not on Windows); else asyncio's."""
    if not uvloop:
        return None
    try:
        import uvloop as fast
    except ImportError:
        return None
    return fast.new_event_loop
