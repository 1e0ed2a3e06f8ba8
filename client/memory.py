"""Hand the memory a site process freed back to the operating system once a message is answered.

glibc's allocator keeps freed blocks in its heaps for reuse, and a training step's activations
or a whole tile's sliding window leave them fragmented: a simulated site process, which answers
many rounds of many sites, kept growing by hundreds of MiB that it no longer used
(benchmarks/RESULTS.md, side_by_side). ``malloc_trim`` returns the free pages; elsewhere (macOS,
musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


def release_freed_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc only)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (AttributeError, OSError):
        return None
