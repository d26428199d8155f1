"""Address space reserved up front, committed by the kernel page by page on first write.

Why: a table that grows by reallocating must copy every row while readers wait; a table whose
arrays already span `max_rows` rows never moves. An anonymous private mapping is zero-filled and
costs physical memory only for the pages written, so reserving 16M rows of a 1M-row table costs
the 1M rows. Large regions ask for transparent huge pages: updates touch rows at random, and with
4 KiB pages nearly every row access is also a TLB miss. On Linux MAP_NORESERVE keeps the
reservation out of the overcommit accounting (under vm.overcommit_memory=2 lower the tables'
max_rows instead). A growing table has its next rows committed ahead by a background thread
(`AheadCommitter`), so its pushes write to pages that are already there.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import sys
import threading
from collections.abc import Callable
from math import prod

import numpy as np

_HUGE_PAGE = 2 << 20
# Commit pages without changing their bytes (Linux 5.14+; Python's mmap names it from 3.13 on).
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)
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


def _region(array: np.ndarray) -> mmap.mmap | None:
    """The mapping behind an array made by `reserve` (None for any other array)."""
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer's view of the mapping
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise through ctypes, which releases the GIL for the call (Python's
    `mmap.madvise` holds it), or None where there is no such call."""
    if _POPULATE_WRITE is None:
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    call.argtypes, call.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return call


_MADVISE = _madvise()


def commit_rows(array: np.ndarray, start: int, stop: int) -> None:
    """Commit the pages of rows [start, stop) of a `reserve`d array now, without touching their
    bytes (MADV_POPULATE_WRITE, Linux 5.14+; elsewhere a no-op: the first writes fault the pages
    in, as they always did). Why: the first write to each page otherwise faults inside the
    writer's copy, page by page, holding the GIL; creating 1M string-keyed rows spent as much
    time in those faults as in everything else. A range of a huge page or more is committed in
    whole huge pages (by address: a range cut inside one would leave it to 4 KiB pages); a
    smaller one in whole 4 KiB pages."""
    global _MADVISE
    region = _region(array)
    if _MADVISE is None or region is None or stop <= start:
        return
    row_bytes, address = array.strides[0], array.ctypes.data
    end = address + len(region)
    page = _HUGE_PAGE if (stop - start) * row_bytes >= _HUGE_PAGE else mmap.PAGESIZE
    first = max(address, (address + start * row_bytes) // page * page)
    last = min(end, -(-(address + stop * row_bytes) // page) * page)
    if last > first and _MADVISE(first, last - first, _POPULATE_WRITE) != 0:
        _MADVISE = None  # an older kernel (EINVAL): leave the pages to the faults from now on


class AheadCommitter:
    """One background thread that commits rows of `reserve`d arrays ahead of their use
    (`commit_rows`, which runs without the GIL): a table asks for the rows past its high-water
    mark while it is still writing the current ones, so its pushes find the pages committed.
    Writes may race with a commit of the same pages: the commit never changes a byte."""

    def __init__(self) -> None:
        self._forget()
        os.register_at_fork(after_in_child=self._forget)  # a forked child has no thread: start its own

    def _forget(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[np.ndarray], int, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, arrays: list[np.ndarray], start: int, stop: int) -> None:
        if _MADVISE is None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="commit-ahead", daemon=True)
                self._thread.start()
        self._jobs.put((arrays, start, stop))

    def _run(self) -> None:
        while True:
            _commit_job(*self._jobs.get())  # in a call: a dropped table's arrays are not held until the next job


def _commit_job(arrays: list[np.ndarray], start: int, stop: int) -> None:
    for array in arrays:
        commit_rows(array, start, stop)


COMMITTER = AheadCommitter()
