"""String-key and numpy-bound figures of `streamrec bench param-server`.

Production tables key rows by string ids, and their rows are created by the push that first sees
an id. So the string figures time exactly what a server does per request: parse the frame the
client sent (ids as one UTF-8 buffer plus offsets, `protocol.encode`), turn it into `Keys`
(`keys_from`, with its checks), then pull or push on a `key_type="str"` table. Creating rows is
timed on a fresh table (every id is new), gathering on the built one, in a shuffled order.

The bound is plain numpy on a float32 matrix of the same rows and width: `values[rows]` (gather)
and `values[rows] += grads` (scatter-add; the rows of a batch are distinct, where this is the
fastest numpy form; `np.add.at` is several times slower). Ratios to it hold on a noisy machine.
Creating rows has a second bound, the rate at which the kernel commits fresh memory
(`memory_commit_bound`): a table that grows writes every new row to pages never touched before,
and on a virtual machine whose memory the host has not yet backed that first touch is slow (here
~0.4 GB/s, against ~7 GB/s to write the same pages again), so `str_create_vs_memory_commit` near
1 says creation waits on memory, not on the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from streamrec.param_server.keys import Keys
from streamrec.param_server.memory import commit_rows, reserve
from streamrec.param_server.protocol import (
    PREFIX,
    encode,
    keys_arrays,
    keys_from,
    parse,
)
from streamrec.param_server.specs import TableSpec
from streamrec.param_server.table import Table

Frame = tuple[bytes, bytearray]  # header, body: what the server reads off the socket


def production_ids(count: int, seed: int = 0) -> list[str]:
    """Distinct ids shaped like ours: half users "u<6-7 digits>", 30% items "i<5-6 digits>" and 20%
    catalogue skus "sku-<12 hex>:<2 digits>", shuffled (mean ~9.5 bytes)."""
    rng = np.random.default_rng(seed)
    users, items = count // 2, count * 3 // 10
    skus = count - users - items
    numbers = rng.choice(9_000_000, users, replace=False) + 100_000
    item_numbers = rng.choice(900_000, items, replace=False) + 10_000
    sku = np.unique(rng.integers(0, 2**48, skus + skus // 100 + 16, dtype=np.int64))[:skus]
    ids = [*map("u{}".format, numbers.tolist()), *map("i{}".format, item_numbers.tolist()),
           *map("sku-{:012x}:{:02d}".format, sku.tolist(), (sku % 97).tolist())]
    return [ids[i] for i in rng.permutation(len(ids))]


def request_frames(ids: list[str], batch: int, name: str) -> list[Frame]:
    """Per batch the frame a client sends: ids only (the gradients are one shared array, whose
    parse is a zero-copy view and would add nothing but memory)."""
    frames = []
    for start in range(0, len(ids), batch):
        keys = Keys.from_strings(ids[start : start + batch])
        buffers = encode({"op": "pull", "table": "bench"}, keys_arrays(keys, name))
        wire = b"".join(buffers)
        head_len = PREFIX.unpack_from(wire)[1]
        frames.append((wire[PREFIX.size : PREFIX.size + head_len], bytearray(wire[PREFIX.size + head_len :])))
    return frames


def _received(frame: Frame, name: str) -> Keys:
    """What the server does with a request's ids before the table sees them."""
    return keys_from(parse(*frame).arrays, name)


def per_second(count: int, run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def string_figures(ids: list[str], dim: int, scalars: int, batch: int, grads: np.ndarray) -> dict[str, Any]:
    """Row creation (every id new), gather and update of existing rows, memory per row."""
    creating = request_frames(ids, batch, "ids0")
    shuffled = [ids[i] for i in np.random.default_rng(1).permutation(len(ids))]
    pulls = request_frames(shuffled, batch, "ids")
    key_bytes = float(np.mean([len(i.encode()) for i in ids]))
    rss_before = rss_bytes()
    table = Table(TableSpec("bench", dim, scalars=scalars, key_type="str", max_rows=max(1 << 20, 2 * len(ids))))
    version = 1

    def push_all(frames: list[Frame], name: str) -> None:
        nonlocal version
        for frame in frames:
            keys = _received(frame, name)
            table.push(keys, grads[: len(keys)], version, 0.0)
            version += 1

    create_rate = per_second(len(ids), lambda: push_all(creating, "ids0"))
    grown = rss_bytes() - rss_before
    assert table.live_rows == len(ids)

    def gather() -> None:
        for frame in pulls:
            table.pull(_received(frame, "ids"))

    gather_rate = per_second(len(ids), gather)
    apply_rate = per_second(len(ids), lambda: push_all(pulls, "ids"))
    width = dim + scalars
    raw = 2 * 4 * width + key_bytes  # float32 values + Adagrad accumulator + the id's bytes
    return {
        "str_ids": len(ids),
        "str_mean_key_bytes": round(key_bytes, 2),
        "str_gather_keys_per_second": round(gather_rate),
        "str_apply_new_rows_per_second": round(create_rate),
        "str_apply_rows_per_second": round(apply_rate),
        "str_bytes_per_row": round(grown / len(ids), 1),
        "str_raw_bytes_per_row": round(raw, 1),
        "str_bytes_ratio": round(grown / len(ids) / raw, 3),
    }


def numpy_bound(num_rows: int, width: int, batch: int, grads: np.ndarray) -> dict[str, float]:
    """Plain numpy gather and scatter-add of the same number of rows of the same width."""
    values = np.random.default_rng(4).random((num_rows, width), dtype=np.float32)  # every page touched
    order = np.random.default_rng(5).permutation(num_rows)
    batches = [order[start : start + batch] for start in range(0, num_rows, batch)]

    def gather() -> None:
        for rows in batches:
            values[rows]

    def scatter() -> None:
        for rows in batches:
            values[rows] += grads[: rows.size]

    return {
        "numpy_gather_rows_per_second": round(per_second(num_rows, gather)),
        "numpy_scatter_rows_per_second": round(per_second(num_rows, scatter)),
    }


def memory_commit_bound(megabytes: int = 256) -> dict[str, float]:
    """How fast this process gets fresh memory committed (`memory.commit_rows`, as a growing table
    does) and then rewrites the same pages: the first is a bound on row creation."""
    rows = reserve((megabytes, 1 << 20), np.uint8)
    started = time.perf_counter()
    commit_rows(rows, 0, megabytes)
    rows[:, ::4096] = 1  # pages the commit could not reach (a kernel without it) fault in here
    first = time.perf_counter() - started
    started = time.perf_counter()
    rows.fill(2)
    again = time.perf_counter() - started
    return {"memory_commit_mb_per_second": round(megabytes / first), "memory_rewrite_mb_per_second": round(megabytes / again)}
