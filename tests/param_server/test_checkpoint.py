"""Checkpoint files: bit-for-bit round trip, corrupt and truncated files rejected and skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamrec.param_server import checkpoint
from streamrec.param_server.checkpoint import CheckpointDir, CorruptCheckpoint
from streamrec.param_server.keys import Keys, as_keys
from streamrec.param_server.optimizers import OptimizerSpec
from streamrec.param_server.store import ParamStore
from streamrec.param_server.table import TableSpec


def populated_store() -> ParamStore:
    store = ParamStore(0, 1)
    store.create_table(TableSpec("users", 8, scalars=1, min_count=2, ttl=50.0))
    store.create_table(TableSpec("items", 4, key_type="int", optimizer=OptimizerSpec("sgd", 0.1)))
    rng = np.random.default_rng(0)
    for step in range(6):
        users = as_keys([f"u{i}" for i in rng.integers(0, 300, 200)])
        items = Keys(ints=rng.integers(0, 10**12, 200))
        store.push(
            [("users", users, rng.normal(size=(200, 9)).astype(np.float32)), ("items", items, rng.normal(size=(200, 4)).astype(np.float32))],
            meta={"offsets": {"events-0": step}},
            events=200,
            event_time=1000.0 + 20 * step,  # later steps expire early users
        )
    store.put_blob("model", b"\x00weights\xff")
    return store


def table_arrays(store: ParamStore) -> dict[str, np.ndarray]:
    out = {}
    for name, table in store.tables.items():
        header, arrays = table.export()
        out.update({f"{name}.{k}": v for k, v in arrays.items()})
    return out


def test_round_trip_is_bit_for_bit(tmp_path: Path) -> None:
    store = populated_store()
    assert store.tables["users"].evicted > 0 and store.tables["users"].rejected > 0
    result = CheckpointDir(tmp_path, 0, 1).save(store)
    restored, path = CheckpointDir(tmp_path, 0, 1).load_newest()
    assert path == result.path
    before, after = table_arrays(store), table_arrays(restored)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and before[name].tobytes() == after[name].tobytes(), name
    assert restored.meta == {"offsets": {"events-0": 5}} and restored.applied_events == 1200
    assert restored.get_blob("model").data == b"\x00weights\xff"
    assert restored.version > store.version  # a new incarnation never reuses versions
    for name in ("users", "items"):
        old, new = store.tables[name], restored.tables[name]
        keys = old.keys_of(old.alive_rows())
        assert np.array_equal(old.pull(keys)[0], new.pull(keys)[0])
        assert new.info()["rows"] == old.info()["rows"]
        assert new.changed_rows(store.version)[1]  # readers from before the restart are reset
    # the restored table keeps working: admission state and optimiser state included
    restored.push([("users", as_keys(["u1"]), np.ones((1, 9), np.float32))], event_time=2000.0)


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) - 100]
    else:
        data[:8] = b"NOTACKPT"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "magic"])
def test_corrupt_checkpoint_is_rejected_and_older_one_used(tmp_path: Path, how: str) -> None:
    store = populated_store()
    ckpts = CheckpointDir(tmp_path, 0, 1)
    first = ckpts.save(store)
    store.put_blob("later", b"x")
    second = ckpts.save(store)
    corrupt(second.path, how)
    with pytest.raises(CorruptCheckpoint):
        checkpoint.read(second.path)
    restored, path = ckpts.load_newest()
    assert path == first.path and "later" not in restored.blobs
    assert len(ckpts.rejected) == 1


def test_checkpoint_of_another_shard_layout_is_refused(tmp_path: Path) -> None:
    result = CheckpointDir(tmp_path, 0, 1).save(populated_store())
    other = CheckpointDir(tmp_path, 0, 2)
    other.dir.mkdir(parents=True)
    result.path.rename(other.dir / result.path.name)
    assert other.load_newest() is None and "shard 0 of 1" in other.rejected[0]
