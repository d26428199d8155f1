"""`streamrec bench param-server`: push, pull and memory figures of the store, measured on this machine.

In-process figures use one Table; remote figures start a real server process on loopback and
talk to it with ParamClient. Memory is the growth of this process's resident set while the
1M-row table is built (/proc/self/statm), so it includes the key index and every side array.
`push_p99_ms_during_checkpoint`: the p99 latency of small pushes (64 rows) sent one after another
while the server writes a checkpoint of the 1M-row table (forced by a second client).
`str_*`: string ids shaped like production ids, rows created by the push that first sees them, the
server's per-request parsing included (`bench_strings`); `*_vs_numpy`: ratios to a plain numpy
gather / scatter-add of the same rows measured in the same run; `str_create_vs_memory_commit`: the
memory that row creation committed per second, as a fraction of what the kernel commits when
nothing else runs (`bench_strings.memory_commit_bound`).
`delta_seconds_100k` and `checkpoint_seconds_1m` keep the names of the default run (a delta of 100k
changed rows, a checkpoint of the 1M-row table); `delta_rows` and `checkpoint_rows` beside them
give the sizes this run measured, which `--ids` makes smaller.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from streamrec.core.parent_watch import watched_env
from streamrec.param_server.bench_strings import (
    memory_commit_bound,
    numpy_bound,
    per_second,
    production_ids,
    rss_bytes,
    string_figures,
)
from streamrec.param_server.client import ParamClient
from streamrec.param_server.keys import Keys
from streamrec.param_server.specs import TableSpec
from streamrec.param_server.table import Table

SCALARS = 1  # a bias per row, as the trainer uses
SMALL_PUSH = 64  # rows of a push timed during a checkpoint


def _batches(ids: np.ndarray, batch: int) -> list[np.ndarray]:
    return [ids[start : start + batch] for start in range(0, ids.size, batch)]


def _in_process(ids: np.ndarray, dim: int, batch: int, grads: np.ndarray) -> tuple[dict[str, Any], Table]:
    rss_before = rss_bytes()
    table = Table(TableSpec("bench", dim, scalars=SCALARS, key_type="int"))
    version = 1
    for part in _batches(ids, batch):
        table.push(Keys(ints=part), grads[: part.size], version, 0.0)
        version += 1
    grown = rss_bytes() - rss_before
    shuffled = [Keys(ints=part) for part in _batches(np.random.default_rng(1).permutation(ids), batch)]

    def gather() -> None:
        for keys in shuffled:
            table.pull(keys)

    def apply() -> None:
        for step, keys in enumerate(shuffled):
            table.push(keys, grads[: len(keys)], version + step, 0.0)

    width = dim + SCALARS
    return {
        "gather_keys_per_second": round(per_second(ids.size, gather)),
        "apply_rows_per_second": round(per_second(ids.size, apply)),
        "bytes_per_row": round(grown / ids.size, 1),
        "raw_bytes_per_row": 2 * 4 * width,  # float32 values + Adagrad accumulator
    }, table


def _collisions(int_table: Table, ids: np.ndarray, num_strings: int) -> int:
    """Distinct ids that share a row with another id (or lost theirs): must be 0."""
    rows = int_table.lookup(Keys(ints=ids))
    int_collisions = np.unique(ids).size - np.unique(rows[rows >= 0]).size + int(np.count_nonzero(rows < 0))
    rng = np.random.default_rng(2)
    strings = Keys.from_strings(list(map("s{:x}".format, rng.integers(0, 2**63, num_strings).tolist())))
    table = Table(TableSpec("strings", 1, key_type="str", optimizer=int_table.spec.optimizer, max_rows=2 * num_strings))
    for start in range(0, num_strings, 65536):
        part = strings.take(np.arange(start, min(num_strings, start + 65536)))
        table.assign(part, np.zeros((len(part), 1), np.float32), 1, 0.0)
    rows = table.lookup(strings)
    distinct = len(set(strings.to_list()))
    return int(int_collisions + distinct - np.unique(rows[rows >= 0]).size + np.count_nonzero(rows < 0))


def _pushes_during_checkpoint(client: ParamClient, address: str, ids: np.ndarray, grads: np.ndarray) -> dict[str, Any]:
    """Small pushes, timed one by one, while another connection has a checkpoint written of the
    table's rows (`checkpoint_rows`, read from the server just before)."""
    rows = int(client.tables()["bench"]["rows"])
    finished: list[dict[str, Any]] = []

    def checkpoint() -> None:
        with ParamClient([address], timeout=600) as admin:
            finished.extend(admin.checkpoint())

    writer = threading.Thread(target=checkpoint)
    rng = np.random.default_rng(3)
    latencies = []
    writer.start()
    while writer.is_alive():
        part = ids[rng.integers(0, ids.size, SMALL_PUSH)]
        started = time.perf_counter()
        client.push({"bench": (part, grads[:SMALL_PUSH])})
        latencies.append(time.perf_counter() - started)
    writer.join()
    return {
        "push_p99_ms_during_checkpoint": round(1000 * float(np.percentile(latencies, 99)), 2),
        "pushes_during_checkpoint": len(latencies),
        "checkpoint_seconds_1m": round(finished[0]["seconds"], 2),
        "checkpoint_rows": rows,
    }


def _remote(ids: np.ndarray, dim: int, batch: int, grads: np.ndarray, checkpoint_dir: str) -> dict[str, Any]:
    server = subprocess.Popen(
        [sys.executable, "-m", "streamrec.param_server", "--port", "0", "--checkpoint-dir", checkpoint_dir,
         "--checkpoint-every", "0", "--metrics-port", "0"],
        env=watched_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = json.loads(server.stdout.readline())["address"]
        with ParamClient([address]) as client:
            client.create_table("bench", dim, scalars=SCALARS, key_type="int")
            parts = _batches(ids, batch)
            for part in parts:  # create every row first: pushes below update existing rows
                client.push({"bench": (part, grads[: part.size])})
            since = client.delta("bench", 0).version

            def pull() -> None:
                for part in parts:
                    client.pull("bench", part)

            def push() -> None:
                for part in parts:
                    client.push({"bench": (part, grads[: part.size])})

            pull_rate = per_second(ids.size, pull)
            since = client.delta("bench", since).version
            push_rate = per_second(ids.size, push)
            since = client.delta("bench", since).version
            changed = ids[: min(100_000, ids.size)]
            for part in _batches(changed, batch):
                client.push({"bench": (part, grads[: part.size])})
            started = time.perf_counter()
            delta = client.delta("bench", since)
            delta_seconds = time.perf_counter() - started
            assert len(delta.ids) == changed.size
            started = time.perf_counter()
            client.delta("bench", delta.version)
            empty_seconds = time.perf_counter() - started
            during = _pushes_during_checkpoint(client, address, ids, grads)
        return {
            "remote_pull_keys_per_second": round(pull_rate),
            "remote_push_rows_per_second": round(push_rate),
            "delta_seconds_100k": round(delta_seconds, 4),
            "delta_rows": int(len(delta.ids)),
            "empty_delta_seconds": round(empty_seconds, 5),
            **during,
        }
    finally:
        server.kill()  # no final checkpoint: the measured one is all this run needs
        server.wait(timeout=60)


def run_benchmark(num_ids: int = 1_000_000, dim: int = 64, batch: int = 4096) -> dict[str, Any]:
    """Every figure of the module docstring for a table of `num_ids` rows of `dim` values, pushed
    and pulled `batch` rows at a time (each at least 1: 0 failed deep inside with a traceback)."""
    for name, size in (("ids", num_ids), ("dim", dim), ("batch", batch)):
        if size < 1:
            raise ValueError(f"{name}: at least 1, not {size}")
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(-(2**63), 2**63 - 1, num_ids, dtype=np.int64))
    ids = rng.permutation(ids)
    grads = rng.normal(size=(batch, dim + SCALARS)).astype(np.float32) * 0.01
    result: dict[str, Any] = {"ids": int(ids.size), "dim": dim, "scalars": SCALARS, "batch": batch, "optimizer": "adagrad"}
    figures, table = _in_process(ids, dim, batch, grads)
    result.update(figures)
    result["collisions"] = _collisions(table, ids, num_ids)
    del table
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-ps-") as checkpoint_dir:
        result.update(_remote(ids, dim, batch, grads, checkpoint_dir))
    result.update(memory_commit_bound())  # just before the string table grows into fresh memory
    result.update(string_figures(production_ids(num_ids), dim, SCALARS, batch, grads))
    result.update(numpy_bound(num_ids, dim + SCALARS, batch, grads))
    created_mb = result["str_apply_new_rows_per_second"] * result["str_bytes_per_row"] / (1 << 20)
    result["str_create_vs_memory_commit"] = round(created_mb / result["memory_commit_mb_per_second"], 3)
    result["bytes_ratio"] = round(result["bytes_per_row"] / result["raw_bytes_per_row"], 3)
    for name, figure, bound in (
        ("gather_vs_numpy", "gather_keys_per_second", "numpy_gather_rows_per_second"),
        ("apply_vs_numpy", "apply_rows_per_second", "numpy_scatter_rows_per_second"),
        ("str_gather_vs_numpy", "str_gather_keys_per_second", "numpy_gather_rows_per_second"),
        ("str_apply_vs_numpy", "str_apply_new_rows_per_second", "numpy_scatter_rows_per_second"),
    ):
        result[name] = round(result[figure] / result[bound], 3)
    return result
