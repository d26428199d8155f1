"""Address space reserved up front, committed by the kernel page by page on first write.

Why: a table that grows by reallocating must copy every row while readers wait; a table whose
arrays already span `max_rows` rows never moves. An anonymous private mapping is zero-filled and
costs physical memory only for the pages written, so reserving 16M rows of a 1M-row table costs
the 1M rows. Large regions ask for transparent huge pages: updates touch rows at random, and with
4 KiB pages nearly every row access is also a TLB miss. On Linux MAP_NORESERVE keeps the reservation out of the overcommit accounting (under
vm.overcommit_memory=2 lower the tables' max_rows instead).
"""

from __future__ import annotations

import mmap
import sys
from math import prod

import numpy as np

_HUGE_PAGE = 2 << 20
# Python's mmap module does not export MAP_NORESERVE before 3.13; the Linux value is 0x4000.
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


def reserve(shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
    """A zero-filled writable array of `shape`, backed by pages committed only when touched."""
    count = prod(shape)
    nbytes = max(1, count * np.dtype(dtype).itemsize)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE
    region = mmap.mmap(-1, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if nbytes >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(region, dtype=dtype, count=count).reshape(shape)
