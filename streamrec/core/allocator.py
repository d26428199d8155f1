"""The C allocator's settings for streamrec's long-running processes (trainer, parameter server,
serving workers).

Why: under glibc's defaults a long-running, multi-threaded numpy process keeps memory it has
freed, and its resident size creeps up for hours. Two defaults cause it:
- one malloc arena per thread that allocates (up to 8 per core), each holding on to what its
  thread freed: the trainer's Kafka, feature-store and metrics threads each grow their own;
- a sliding mmap threshold: after the first large array is freed, glibc raises the threshold at
  which it maps memory (up to 32 MB), so later batch-sized arrays (a few MB) come from the heap,
  where one long-lived small object above them keeps the whole heap from shrinking.
So every process sets at most 2 arenas, maps every block of 128 KiB or more (and unmaps it when
freed), and trims the top of its heap above 128 KiB. Measured with `streamrec bench soak` in
docs/performance.md.

A user's own `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` stands:
glibc read it when the process started, and it is not overridden. The values are also put into
the environment, so the processes this one starts (serving's spawned workers, the stack's
components) start with them. Other C libraries (musl, macOS) have their own policies: nothing is
done there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

SETTINGS = (  # (environment variable glibc reads at start, mallopt parameter, value)
    ("MALLOC_ARENA_MAX", M_ARENA_MAX, 2),
    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, 128 * 1024),
    ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, 128 * 1024),
)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on any other C library
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator() -> dict[str, int]:
    """Apply the settings above to this process (before its threads start, so the arena limit
    holds for all of them) and to the processes it starts; returns what was set here, by
    environment name (empty on another C library)."""
    libc = _glibc()
    if libc is None:
        return {}
    applied: dict[str, int] = {}
    for env_name, parameter, value in SETTINGS:
        if env_name in os.environ:  # the user's choice; glibc applied it at start
            continue
        if libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) != 1:
            log.warning("mallopt(%d, %d) was refused; %s keeps glibc's default", parameter, value, env_name)
            continue
        os.environ[env_name] = str(value)
        applied[env_name] = value
    return applied


class HeapTrimmer:
    """Hands the heap's free pages back to the system (glibc's `malloc_trim`) at most every
    `interval_s` seconds, called from a loop the process runs anyway (the trainer's batches,
    serving's polls). Even with the settings above, freed blocks between live ones stay resident
    until something releases them: one call returned 240 MB of a fragmented 418 MB heap in 65 ms
    here. It holds the allocator's locks meanwhile, so it runs seldom and off any request."""

    def __init__(self, interval_s: float = 30.0) -> None:
        self.interval_s = interval_s
        self._libc = _glibc()
        self._last = time.monotonic()

    def trim_if_due(self) -> bool:
        """Trim when the interval has passed; True when it did."""
        now = time.monotonic()
        if self._libc is None or now - self._last < self.interval_s:
            return False
        self._last = now
        self._libc.malloc_trim(ctypes.c_size_t(0))
        return True
