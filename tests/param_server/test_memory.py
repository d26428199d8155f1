"""Reserved table memory: pages committed ahead of use hold their bytes and become resident."""

from __future__ import annotations

import time

import numpy as np
import pytest

from streamrec.param_server import memory
from streamrec.param_server.specs import TableSpec
from streamrec.param_server.table import Table

pytestmark = pytest.mark.skipif(memory._MADVISE is None, reason="no MADV_POPULATE_WRITE here")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def mapping_resident_bytes(array: np.ndarray) -> int:
    """Resident bytes of the mapping behind `array` alone: the process's RSS also moves with what
    other threads of the test worker free or touch meanwhile (it once fell 8 MB short under xdist)."""
    address = array.__array_interface__["data"][0]
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                start, end = (int(bound, 16) for bound in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the array")


def test_committing_rows_makes_them_resident_and_changes_no_byte():
    array = memory.reserve((1 << 16, 256), np.float32)  # 64 MiB
    array[:100] = np.arange(100 * 256, dtype=np.float32).reshape(100, 256)
    before = mapping_resident_bytes(array)
    memory.commit_rows(array, 0, 1 << 15)  # the written rows, and 32 MiB past them
    assert mapping_resident_bytes(array) - before >= (1 << 15) * 256 * 4 - (4 << 20)
    np.testing.assert_array_equal(array[:100], np.arange(100 * 256, dtype=np.float32).reshape(100, 256))
    assert not array[100:].any()


def test_a_growing_table_has_its_next_rows_committed_in_the_background():
    table = Table(TableSpec("t", 64, scalars=1, max_rows=1 << 20))
    rows = table._allocate(10)
    assert table.committed_rows >= 1024 > 10  # a small table commits little ahead
    table.block[rows] = 1.0  # the rows in use stay writable and keep what is written
    for _ in range(100):  # the committer runs while the table keeps growing
        table._allocate(1000)
    assert table.committed_rows > table.size
    assert (table.block[rows] == 1.0).all() and not table.block[10:table.size].any()


def test_a_dropped_table_frees_its_memory_although_the_committer_saw_it():
    table = Table(TableSpec("t", 256, max_rows=1 << 20))
    table._allocate(200_000)  # ~400 MB of block in use, and its next rows submitted
    table.block[: table.size] = 1.0
    peak = resident_bytes()
    del table
    deadline = time.monotonic() + 10
    while resident_bytes() > peak - (300 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resident_bytes() <= peak - (300 << 20)
