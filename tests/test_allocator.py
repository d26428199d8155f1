"""The allocator settings of the long-running processes (streamrec.core.allocator), observed
through glibc's own accounting in fresh interpreters: each check runs once with the settings and
once without, so it fails if they stop taking effect."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamrec.core.allocator import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the settings are glibc's")

PROBE = r"""
import ctypes, json, os, sys, threading
import numpy as np
from streamrec.core.allocator import _glibc, tune_allocator

applied = tune_allocator() if sys.argv[1] == "tuned" else {}
libc = _glibc()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = MallInfo2

def heaps() -> int:
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    libc.open_memstream.restype = ctypes.c_void_p
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    return ctypes.string_at(buf, size.value).count(b"<heap nr=")

# a batch-sized array freed, then a smaller one: glibc's sliding threshold puts the second on the heap
big = np.ones(10 << 20, np.uint8); del big
before = libc.mallinfo2().hblkhd
mid = np.ones(1 << 20, np.uint8)
mapped = libc.mallinfo2().hblkhd - before >= (1 << 20)

# 8 threads allocating at once: without a limit each can get its own arena
barrier = threading.Barrier(8)
def work() -> None:
    barrier.wait()
    kept = [np.ones(4096, np.uint8) for _ in range(200)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"applied": applied, "heaps": heaps(), "mapped": mapped,
                  "env": {k: os.environ.get(k) for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_")}}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out)


def test_threads_share_at_most_two_arenas_and_batch_arrays_are_mapped() -> None:
    default, tuned = probe("default"), probe("tuned")
    assert default["heaps"] > 2 and not default["mapped"]  # what the settings change
    assert tuned["heaps"] <= 2 and tuned["mapped"]
    assert tuned["applied"] == {"MALLOC_ARENA_MAX": 2, "MALLOC_MMAP_THRESHOLD_": 131072,
                                "MALLOC_TRIM_THRESHOLD_": 131072}
    # the processes this one starts get the same settings from their environment
    assert tuned["env"] == {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}


def test_a_users_own_setting_stands() -> None:
    tuned = probe("tuned", MALLOC_ARENA_MAX="4")
    assert "MALLOC_ARENA_MAX" not in tuned["applied"]
    assert tuned["env"]["MALLOC_ARENA_MAX"] == "4"
    assert tuned["mapped"]  # the others still apply
