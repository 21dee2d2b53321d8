"""gateway/memory.py: after keep_large_blocks(), a multi-megabyte block comes from the
heap and stays there when freed (so the next large reply lands in warm pages), where
glibc's default maps and unmaps it. Each case in a fresh interpreter: malloc's
settings are process-wide and adapt to what the process has freed before."""

from __future__ import annotations

import ctypes
import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
    or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc's malloc (mallinfo2) only",
)  # fmt: skip

PROBE = """
import ctypes, json, sys
from gateway import memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
kept = memory.keep_large_blocks() if sys.argv[1] == "keep" else None
before = libc.mallinfo2()
block = bytearray(8 << 20)  # a large reply's size
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(json.dumps({
    "kept": kept,
    "mapped": during.hblkhd - before.hblkhd,
    "heap_free_after": after.fordblks,
}))
"""


def _probe(mode: str) -> dict[str, int | bool | None]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, int | bool | None] = json.loads(out)
    return result


def test_a_large_block_is_mapped_and_given_back_by_default() -> None:
    default = _probe("default")
    assert default["mapped"] >= 8 << 20
    assert default["heap_free_after"] < 8 << 20


def test_kept_a_large_block_comes_from_the_heap_and_stays_for_reuse() -> None:
    kept = _probe("keep")
    assert kept["kept"] is True
    assert kept["mapped"] == 0
    assert kept["heap_free_after"] >= 8 << 20
