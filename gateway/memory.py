"""The front's malloc settings: large blocks kept for reuse instead of handed back.

A large reply (four 1.5 MB images: a 6 MB gRPC message) reaches the front as one
message that grpc copies twice, holding the event loop, into blocks malloc'd for it.
glibc serves a block that big from a fresh mmap and unmaps it on free, so every
such reply is copied into new pages: a page fault per 4 KiB while every other
request waits. Served from the heap and kept there after free, the next reply
reuses warm pages (bench/profile notes in docs/performance.md: the front's longest
stall per second, median of 24, 5.5 -> 4.0-4.5 ms; its CPU per large request 10 ->
8.5 ms). The service gained nothing measurable from the same setting, so only a
process that runs a front sets it.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("imagegate.gateway")

# mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap; up to this much free memory at the top
# of the heap is kept rather than given back. A larger reply still gets its own mmap.
KEEP_BYTES = 64 << 20


def keep_large_blocks() -> bool:
    """Tell glibc's malloc to keep large blocks (False where there is no mallopt)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    kept = bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    )
    if not kept:
        log.debug("malloc did not take the large-block settings")
    return kept
