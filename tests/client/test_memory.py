"""A site process gives back what it freed: a simulated site answers many rounds of many sites in
one process, and freed memory left in the C heap made it grow round after round."""

from __future__ import annotations

import os
import platform

import pytest

from fedseg.client.memory import release_freed_memory


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_system() -> None:
    # 64 KiB blocks come from the heap (under glibc's mmap threshold); keeping every tenth
    # pins the heap's top, so freeing the rest returns nothing by itself: a fragmented heap
    blocks = [bytearray(64 * 1024) for _ in range(3000)]
    kept = blocks[::10]
    del blocks
    before = _resident_bytes()
    release_freed_memory()
    after = _resident_bytes()
    assert before - after > 100 * 2**20, (before, after)
    assert all(len(b) == 64 * 1024 and not any(b[:16]) for b in kept)  # what is in use stays
