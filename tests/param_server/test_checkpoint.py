"""Checkpoint files: bit-for-bit round trip, a snapshot consistent at one version while pushes run,
and any file that fails to load (corrupt, truncated, wrong version, inconsistent) skipped for the
previous one."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from streamrec.param_server import checkpoint
from streamrec.param_server.checkpoint import CheckpointDir, CorruptCheckpoint
from streamrec.param_server.keys import Keys, as_keys
from streamrec.param_server.snapshot import BlockSnapshot
from streamrec.param_server.specs import OptimizerSpec, TableSpec
from streamrec.param_server.store import ParamStore
from streamrec.param_server.table import Table

ROW_ARRAYS = ("block", "row_key", "row_version", "row_time", "row_slot", "row_key_start", "row_key_len")


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
            ranges={"events/0": (200 * step, 200 * step + 200)},
            item_counts=([f"i{step % 4}", "all"], np.array([200, 200])),
        )
    store.claim(["events/0", "events/1"])
    store.put_blob("model", b"\x00weights\xff")
    return store


def table_arrays(store: ParamStore) -> dict[str, np.ndarray]:
    """Every per-row array of every table over its used rows (slots differ after an index rebuild:
    compared as alive flags)."""
    out = {}
    for name, table in store.tables.items():
        for array in ROW_ARRAYS:
            if hasattr(table, array):
                values = getattr(table, array)[: table.size]
                out[f"{name}.{array}"] = values >= 0 if array == "row_slot" else values
        out[f"{name}.free_rows"] = table.free_rows
    return out


def test_round_trip_is_bit_for_bit(tmp_path: Path) -> None:
    store = populated_store()
    assert store.tables["users"].evicted > 0 and store.tables["users"].rejected > 0
    result = CheckpointDir(tmp_path, 0, 1).save(store)
    loaded = CheckpointDir(tmp_path, 0, 1).load_newest()
    restored, path = loaded.store, loaded.path
    assert path == result.path and not restored.empty and restored.incarnation != store.incarnation
    before, after = table_arrays(store), table_arrays(restored)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and before[name].tobytes() == after[name].tobytes(), name
    assert restored.meta == {"offsets": {"events-0": 5}} and restored.applied_events == 1200
    assert restored.watermarks() == {"events/0": 1200}
    assert restored.ledger.epochs == store.ledger.epochs and set(restored.ledger.epochs) == {"events/0", "events/1"}
    assert restored.item_event_counts() == {"i0": 400, "i1": 400, "i2": 200, "i3": 200, "all": 1200}
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
    """Damage a checkpoint: flipped bit, truncation, bad magic (the digest catches these), or a
    re-checksummed file with an unknown format version or contents that do not add up."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) - 100]
    elif how == "magic":
        data[:8] = b"NOTACKPT"
    else:
        header, arrays = checkpoint.read(path)
        arrays = {name: np.array(array) for name, array in arrays.items()}
        if how == "version":
            header["format"] = checkpoint.FORMAT_VERSION + 1
        elif how == "free_rows":
            arrays["t0.free_rows"] = np.zeros(3, np.int64)  # live rows listed as free
        elif how == "size":
            header["tables"][0]["size"] += 1
        elif how == "counts":
            arrays["items.counts"] = arrays["items.counts"][:-1]
        checkpoint.write(path, header, arrays)
        return
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "magic", "version", "free_rows", "size", "counts"])
def test_checkpoint_that_fails_to_load_falls_back_to_the_previous(tmp_path: Path, how: str) -> None:
    store = populated_store()
    ckpts = CheckpointDir(tmp_path, 0, 1)
    first = ckpts.save(store)
    store.put_blob("later", b"x")
    second = ckpts.save(store)
    corrupt(second.path, how)
    with pytest.raises(CorruptCheckpoint):
        ckpts.load(second.path)
    loaded = ckpts.load_newest()
    assert loaded.path == first.path and "later" not in loaded.store.blobs
    assert len(ckpts.rejected) == 1 and str(second.path) in ckpts.rejected[0]
    assert loaded.store.watermarks() == {"events/0": 1200}


@pytest.mark.parametrize("what", ["fifo", "sparse"])
def test_a_file_that_cannot_be_a_checkpoint_is_skipped_before_it_is_read(tmp_path: Path, what: str) -> None:
    """In the newest checkpoint's place: a FIFO (reading it blocked startup for good) or a sparse
    file larger than the machine's memory (reading it ended startup with a MemoryError)."""
    store = populated_store()
    ckpts = CheckpointDir(tmp_path, 0, 1)
    first = ckpts.save(store)
    store.put_blob("later", b"x")
    second = ckpts.save(store)
    second.path.unlink()
    if what == "fifo":
        os.mkfifo(second.path)
    else:
        with open(second.path, "wb") as sparse:
            sparse.truncate(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") + 1)
    loaded = ckpts.load_newest()
    assert loaded is not None and loaded.path == first.path and "later" not in loaded.store.blobs
    assert len(ckpts.rejected) == 1 and str(second.path) in ckpts.rejected[0]


def test_no_loadable_checkpoint_means_none_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    store = populated_store()
    ckpts = CheckpointDir(tmp_path, 0, 1, keep=2)
    saved = []
    for i in range(4):
        store.put_blob("step", bytes([i]))
        saved.append(ckpts.save(store).path)
    assert ckpts.files() == saved[:1:-1]  # newest first, two kept
    for path in ckpts.files():
        corrupt(path, "truncate")
    assert ckpts.load_newest() is None and len(ckpts.rejected) == 2


def test_snapshot_is_consistent_at_one_version_while_pushes_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pushes keep changing (and creating, and evicting) rows while the block is streamed in small
    chunks; the file must hold exactly the rows as they were when the checkpoint started."""
    store = ParamStore()
    store.create_table(TableSpec("t", 8, key_type="int", max_rows=105_000))
    ids = np.arange(100_000)
    store.push([("t", Keys(ints=ids), np.ones((ids.size, 8), np.float32))], event_time=0.0)
    at_start: dict[str, np.ndarray] = {}
    take_view = Table.checkpoint_view

    def recording_view(table: Table, lock: threading.Lock) -> tuple:
        at_start.update(block=table.block[: table.size].copy(), row_time=table.row_time[: table.size].copy())
        return take_view(table, lock)

    monkeypatch.setattr(Table, "checkpoint_view", recording_view)
    chunks = BlockSnapshot.chunks
    stop, pushed = threading.Event(), threading.Semaphore(0)

    def interleaved_chunks(snapshot: BlockSnapshot):  # 100 chunks, each after at least one push
        snapshot.chunk_rows = 1000
        for chunk in chunks(snapshot):
            assert pushed.acquire(timeout=30)
            yield chunk

    monkeypatch.setattr(BlockSnapshot, "chunks", interleaved_chunks)

    def pusher() -> None:
        rng = np.random.default_rng(0)
        step = 0
        while not stop.is_set():
            step += 1
            touched = rng.integers(0, 150_000, 2000)  # existing rows and new ones (which evict)
            store.push([("t", Keys(ints=touched), np.ones((touched.size, 8), np.float32))], event_time=float(step))
            pushed.release()

    thread = threading.Thread(target=pusher)
    thread.start()
    result = CheckpointDir(tmp_path, 0, 1).save(store)
    stop.set()
    thread.join()
    table = CheckpointDir(tmp_path, 0, 1).load(result.path).store.tables["t"]
    assert store.tables["t"].evicted_for_room > 0
    assert np.array_equal(table.block[: table.size], at_start["block"])
    assert np.array_equal(table.row_time[: table.size], at_start["row_time"])
    assert not np.array_equal(store.tables["t"].block[: table.size], at_start["block"])  # the live table moved on
    assert store.tables["t"].snapshot is None  # no pre-images kept after the checkpoint


def test_checkpoint_of_another_shard_layout_is_refused(tmp_path: Path) -> None:
    result = CheckpointDir(tmp_path, 0, 1).save(populated_store())
    other = CheckpointDir(tmp_path, 0, 2)
    other.dir.mkdir(parents=True)
    result.path.rename(other.dir / result.path.name)
    assert other.load_newest() is None and "shard 0 of 1" in other.rejected[0]
