"""The table in-process: collision freedom, admission, expiry, memory reuse, optimiser math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamrec.param_server.admission import CountMinSketch
from streamrec.param_server.keyindex import KeyIndex
from streamrec.param_server.keys import STRING_SEED, Keys, as_keys, mix64
from streamrec.param_server.specs import OptimizerSpec, TableSpec
from streamrec.param_server.store import ParamStore
from streamrec.param_server.table import Table, TableFullError


def grads_for(n: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def test_no_collisions_at_scale() -> None:
    """300k random 64-bit ints and 300k random strings (some sharing prefixes): one row each."""
    rng = np.random.default_rng(1)
    ints = np.unique(rng.integers(-(2**63), 2**63 - 1, 300_000, dtype=np.int64))
    strings = [f"user-{x:x}" for x in rng.integers(0, 2**62, 300_000)]
    strings = list(dict.fromkeys(strings + ["", "é", "user-", "user-0"]))
    for keys in (Keys(ints=ints), as_keys(strings)):
        table = Table(TableSpec("t", 4, key_type=keys.kind, max_rows=1 << 20))
        for start in range(0, len(keys), 50_000):
            part = keys.take(np.arange(start, min(len(keys), start + 50_000)))
            table.assign(part, np.full((len(part), 4), start, np.float32), 1, 0.0)
        rows = table.lookup(keys)
        assert table.live_rows == len(keys)
        assert (rows >= 0).all() and np.unique(rows).size == len(keys)
        assert table.keys_of(rows).to_list() == keys.to_list()


def test_index_resolves_equal_64bit_keys_exactly() -> None:
    """Distinct ids whose 64-bit keys are equal still get distinct rows (exact compare)."""
    exact = np.arange(50) * 7  # the true ids; every 64-bit key collides
    row_key = np.full(64, 42, np.uint64)
    row_slot = np.full(64, -1, np.int32)
    index = KeyIndex(row_key, row_slot)
    same = lambda pos, rows: exact[pos] == rows * 7  # row r holds id 7r
    index.insert(np.full(50, 42, np.uint64), np.arange(50), 50)
    assert (index.find(np.full(50, 42, np.uint64), same) == np.arange(50)).all()
    assert (index.find(np.full(1, 42, np.uint64), lambda pos, rows: rows < 0) == -1).all()


def _unmix64(x: np.ndarray) -> np.ndarray:
    """The inverse of `keys.mix64` (SplitMix64's finaliser): what anyone choosing ids can compute."""
    def unshift(y: np.ndarray, s: int) -> np.ndarray:
        out, shift = y.copy(), s
        while shift < 64:
            out ^= y >> np.uint64(shift)
            shift += s
        return out
    x = unshift(x.astype(np.uint64), 31) * np.uint64(pow(0x94D049BB133111EB, -1, 2**64))
    x = unshift(x, 27) * np.uint64(pow(0xBF58476D1CE4E5B9, -1, 2**64))
    return unshift(x, 30)


def _longest_cluster(slots: np.ndarray) -> int:
    """The longest run of occupied slots: what a probe may have to walk."""
    occupied = np.r_[False, slots != -1, False].astype(np.int8)
    edges = np.flatnonzero(np.diff(occupied))
    return int((edges[1::2] - edges[::2]).max()) if edges.size else 0


def test_chosen_integer_ids_do_not_share_a_home_slot() -> None:
    """20,000 ids chosen so that mix64(id) ends in 20 zero bits all had the same home slot in an
    unsalted index: one cluster of 20,000 slots, walked by every probe (a push of 80,000 such ids
    took 4.9 s and held the store's lock against every other client). With the index's secret
    salt they spread like random ids."""
    chosen = _unmix64(np.arange(1, 20_001, dtype=np.uint64) << np.uint64(20))
    assert (mix64(chosen) & np.uint64((1 << 20) - 1) == 0).all()
    row_key, row_slot = chosen.copy(), np.full(chosen.size, -1, np.int32)
    index = KeyIndex(row_key, row_slot)
    index.insert(chosen, np.arange(chosen.size), chosen.size)
    assert _longest_cluster(index.slots) < 100
    assert (index.find(chosen) == np.arange(chosen.size)).all()


def _ids_sharing_one_public_hash(count: int, seed: int = 0) -> list[str]:
    """`count` distinct 16-byte ASCII ids whose public 64-bit hash (`KeyWords.hash64`) is one
    value: the chain can be inverted, so the second word is solved for any first word."""
    rng = np.random.default_rng(seed)
    start = mix64(np.array([16], np.uint64) ^ np.uint64(STRING_SEED))
    target = _unmix64(np.array([0x0123456789ABCDEF], np.uint64))
    found: dict[str, None] = {}
    while len(found) < count:
        first = rng.integers(0x61, 0x7B, size=(1 << 16, 8), dtype=np.uint8)
        second = (mix64(first.view("<u8").ravel() ^ start) ^ target).view(np.uint8).reshape(-1, 8)
        printable = ((second >= 0x20) & (second < 0x7F)).all(axis=1)
        found.update(dict.fromkeys((a.tobytes() + b.tobytes()).decode() for a, b in zip(first[printable], second[printable])))
    return list(found)[:count]


def test_ids_made_to_share_the_public_hash_neither_pile_up_nor_merge() -> None:
    """Anyone who can post events could make ids share the public string hash in well under a
    second. They shared a home slot too, so every probe walked all of them (400 such ids took one
    push 5 s, holding the shard's lock). Homes now come from a hash under the table's secret."""
    ids = _ids_sharing_one_public_hash(3000)
    keys = Keys.from_strings(ids)
    assert np.unique(keys.hash64()).size == 1
    table = Table(TableSpec("users", 4, key_type="str", max_rows=10_000))
    table.push(keys, np.ones((len(ids), 4), np.float32), 1, 0.0)
    rows = table.lookup(keys)
    assert (rows >= 0).all() and np.unique(rows).size == len(ids)  # exact: one row per id
    assert table.keys_of(rows).to_list() == ids
    assert _longest_cluster(table.index.slots) < 100
    table.index.rebuild(table.alive_rows())  # the homes of stored ids are recomputed alike
    assert (table.lookup(keys) == rows).all() and _longest_cluster(table.index.slots) < 100


def test_a_push_of_ids_made_to_share_a_hash_is_all_or_nothing_on_a_full_table() -> None:
    """Counting new rows by the public hash, 20 such ids looked like one: the push was given room
    for one row, then failed halfway with rows taken and the version raised, and each retry
    evicted more real rows. Now room is made for all 20, or the push is refused untouched."""
    store = ParamStore()
    store.create_table(TableSpec(name="users", dim=4, max_rows=100))
    store.push([("users", Keys.from_strings([f"user-{i}" for i in range(90)]), np.ones((90, 4), np.float32))])
    table, version = store.tables["users"], store.version
    made = _ids_sharing_one_public_hash(130)
    store.push([("users", Keys.from_strings(made[:20]), np.ones((20, 4), np.float32))])
    rows = table.lookup(Keys.from_strings(made[:20]))
    assert (rows >= 0).all() and np.unique(rows).size == 20 and table.live_rows <= 100
    assert (table.row_version[rows] == version + 1).all()  # created and stamped by this push
    before = (store.version, table.live_rows, table.size)
    with pytest.raises(TableFullError):
        store.push([("users", Keys.from_strings(made[20:]), np.ones((110, 4), np.float32))])
    assert (store.version, table.live_rows, table.size) == before
    assert (table.lookup(Keys.from_strings(made[20:])) < 0).all()


def test_string_and_int_ids_round_trip_through_keys() -> None:
    ids = ["a", "ü-ñ", "", "x" * 300]
    keys = as_keys(ids)
    assert keys.to_list() == ids
    assert keys.take(np.array([3, 0])).to_list() == ["x" * 300, "a"]
    assert (as_keys(np.array([5, -1])).ints == [5, -1]).all()
    assert as_keys(["a"]).hash64()[0] != as_keys(["b"]).hash64()[0]


def test_pull_default_and_mask() -> None:
    table = Table(TableSpec("t", 3, scalars=1))
    table.push(as_keys(["a"]), np.zeros((1, 4), np.float32), 1, 0.0)
    values, found = table.pull(as_keys(["a", "b"]))
    assert found.tolist() == [True, False]
    assert (values[1] == 0).all() and np.abs(values[0, :3]).max() > 0  # a was initialised
    again = Table(TableSpec("t", 3, scalars=1)).initial_values(as_keys(["a"]).hash64())
    assert np.array_equal(values[:1], again)  # init is deterministic per id


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_optimiser_matches_torch(name: str) -> None:
    """Several pushes with repeated ids, separate vector/bias rates, against torch.optim."""
    dim, scalars, lr, scalar_lr = 5, 1, 0.07, 0.05
    table = Table(TableSpec("t", dim, scalars=scalars, key_type="int", optimizer=OptimizerSpec(name, lr, scalar_lr)))
    ids = np.arange(6)
    table.push(Keys(ints=ids), np.zeros((6, dim + scalars), np.float32), 1, 0.0)  # creates the rows
    start, _ = table.pull(Keys(ints=ids))
    vec = torch.nn.Parameter(torch.tensor(start[:, :dim]))
    bias = torch.nn.Parameter(torch.tensor(start[:, dim:]))
    opt_cls = torch.optim.SGD if name == "sgd" else torch.optim.Adagrad
    opt = opt_cls([{"params": [vec], "lr": lr}, {"params": [bias], "lr": scalar_lr}])
    rng = np.random.default_rng(3)
    for step in range(5):
        batch = rng.integers(0, 6, 10)  # repeated ids: summed before applying
        grads = grads_for(10, dim + scalars, step)
        table.push(Keys(ints=batch), grads, step + 2, 0.0)
        dense = np.zeros((6, dim + scalars), np.float32)
        np.add.at(dense, batch, grads)
        opt.zero_grad()
        vec.grad = torch.tensor(dense[:, :dim])
        bias.grad = torch.tensor(dense[:, dim:])
        touched = np.unique(batch)  # rows with zero gradient are unchanged on both sides
        opt.step()
        got, _ = table.pull(Keys(ints=touched))
        want = torch.cat([vec, bias], 1).detach().numpy()[touched]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_admission_counts_then_admits() -> None:
    table = Table(TableSpec("t", 2, key_type="int", min_count=3, optimizer=OptimizerSpec("sgd", 1.0)))
    ones = np.ones((1, 2), np.float32)
    for version in (1, 2):
        assert table.push(Keys(ints=np.array([9])), ones, version, 0.0) == 0
        assert not table.pull(Keys(ints=np.array([9])))[1][0]
    assert table.rejected == 2
    assert table.push(Keys(ints=np.array([9])), ones, 3, 0.0) == 1  # third sighting admits and applies
    values, found = table.pull(Keys(ints=np.array([9])))
    assert found[0] and table.admitted == 1
    np.testing.assert_allclose(values[0], table.initial_values(np.array([9], np.uint64))[0] - 1.0)


def test_sketch_never_undercounts() -> None:
    sketch = CountMinSketch(width=1 << 10, depth=4)  # small: forces collisions
    rng = np.random.default_rng(0)
    stream = rng.zipf(1.3, 50_000).astype(np.uint64)
    for part in np.array_split(stream, 20):
        sketch.add(part)
    keys, truth = np.unique(stream, return_counts=True)
    estimate = sketch.add(keys) - 1
    assert (estimate >= truth).all()
    bound = np.e / sketch.width * stream.size
    assert np.mean(estimate - truth <= bound) >= 0.98


def test_expiry_evicts_reports_and_reuses_memory() -> None:
    table = Table(TableSpec("t", 2, key_type="int", ttl=10.0, max_rows=8))
    g = np.zeros((4, 2), np.float32)
    table.push(Keys(ints=np.arange(4)), g, 1, 100.0)
    table.push(Keys(ints=np.arange(2)), g[:2], 2, 105.0)  # ids 0, 1 refreshed
    table.push(Keys(ints=np.array([0])), g[:1], 3, 112.0)  # 2, 3 are 12s old: evicted
    assert table.pull(Keys(ints=np.arange(4)))[1].tolist() == [True, True, False, False]
    assert sorted(table.deleted_since(2).to_list()) == [2, 3]
    assert table.deleted_since(3).to_list() == []
    table.push(Keys(ints=np.arange(10, 14)), g, 4, 113.0)  # reuses the two freed rows
    assert table.size == 6 and table.live_rows == 6 and table.evicted == 2


def test_full_table_evicts_least_recently_updated_by_event_time() -> None:
    table = Table(TableSpec("t", 2, key_type="int", max_rows=6))
    g = np.zeros((6, 2), np.float32)
    table.push(Keys(ints=np.arange(6)), g, 1, 100.0)
    table.push(Keys(ints=np.array([0, 1, 4])), g[:3], 2, 110.0)
    table.push(Keys(ints=np.array([2, 5])), g[:2], 3, 105.0)  # event time, not arrival order, decides
    # 2 new ids need 2 rows: the least recently updated are 3 (100), then 2 and 5 (105); 3 is kept
    # because this push updates it
    table.push(Keys(ints=np.array([3, 10, 11])), g[:3], 4, 130.0)
    assert table.pull(Keys(ints=np.arange(6)))[1].tolist() == [True, True, False, True, True, False]
    assert table.evicted_for_room == 2 and table.evicted == 0 and table.live_rows == 6
    assert sorted(table.deleted_since(3).to_list()) == [2, 5]  # delta readers learn of the evictions
    with pytest.raises(TableFullError, match="max_rows=6"):  # 7 new ids cannot fit even after eviction
        table.push(Keys(ints=np.arange(20, 27)), np.zeros((7, 2), np.float32), 5, 140.0)
    assert table.live_rows == 6 and table.evicted_for_room == 2  # the refused push changed nothing


def test_wrong_shapes_kinds_and_values_are_refused_before_any_change() -> None:
    table = Table(TableSpec("t", 2, key_type="int", min_count=2))
    with pytest.raises(ValueError, match="shape"):
        table.prepare_push(Keys(ints=np.arange(2)), np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError):
        table.lookup(as_keys(["a"]))
    bad = np.zeros((2, 2), np.float32)
    bad[1, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        table.push(Keys(ints=np.arange(2)), bad, 1, 0.0)
    assert table.push(Keys(ints=np.arange(2)), np.zeros((2, 2), np.float32), 2, 0.0) == 0  # first sighting
    assert table.rejected == 2  # the refused push was not counted as a sighting


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_first_push_of_new_ids_equals_create_then_update(name: str) -> None:
    """New rows get their first update before they are written (one write per row): values and
    accumulators must be bit-identical to initial values followed by the optimiser step, whether
    the push has only new ids, new and existing ids, or a new id repeated (gradients summed)."""
    dim, scalars = 4, 1
    spec = TableSpec("t", dim, scalars=scalars, key_type="str", optimizer=OptimizerSpec(name, 0.1, 0.05, initial_accumulator=0.1))
    table = Table(spec)
    reference: dict[str, np.ndarray] = {}  # id -> whole block row (values, then accumulators)

    def push(ids: list[str], seed: int) -> None:
        grads = grads_for(len(ids), dim + scalars, seed)
        table.push(as_keys(ids), grads, seed + 1, 0.0)
        summed: dict[str, np.ndarray] = {}
        for key, grad in zip(ids, grads):
            summed[key] = summed[key] + grad if key in summed else grad.copy()
        for key, grad in summed.items():
            if key not in reference:
                row = np.zeros((1, table.block.shape[1]), np.float32)
                row[:, : dim + scalars] = table.initial_values(as_keys([key]).hash64())
                row[:, dim + scalars :] = spec.optimizer.initial_accumulator
                reference[key] = row
            table.optimizer.apply(reference[key], np.zeros(1, np.int64), grad[None, :])

    push(["a", "b", "c"], 0)  # all new
    push(["c", "d", "a", "e"], 1)  # new beside existing
    push(["f", "b", "f", "g", "b"], 2)  # a new id and an existing id repeated
    keys = sorted(reference)
    rows = table.lookup(as_keys(keys))
    np.testing.assert_array_equal(table.block[rows], np.concatenate([reference[k] for k in keys]))


def read_only(array: np.ndarray) -> np.ndarray:
    """The same values in a read-only buffer, as np.frombuffer or a copy-on-write pandas array gives."""
    return np.frombuffer(array.tobytes(), array.dtype).reshape(array.shape)


@pytest.mark.parametrize("key_type", ["int", "str"])
def test_read_only_inputs_are_taken_like_writable_ones(key_type: str) -> None:
    """The compiled row kernels refuse read-only buffers; the table must take them (a local store's
    caller may hand it any array) with the same result as writable ones."""
    spec = TableSpec("t", 4, scalars=1, key_type=key_type)
    writable, frozen = Table(spec), Table(spec)
    raw = np.arange(20, dtype=np.int64)
    ids = Keys(ints=raw) if key_type == "int" else as_keys([f"id:{i}" for i in raw])
    frozen_ids = Keys(ints=read_only(raw)) if key_type == "int" else ids
    for version, seed in enumerate((1, 2), start=1):  # creation, then existing rows
        grads = grads_for(len(raw), 5, seed)
        writable.push(ids, grads, version, 0.0)
        frozen.push(frozen_ids, read_only(grads), version, 0.0)
    np.testing.assert_array_equal(frozen.pull(frozen_ids)[0], writable.pull(ids)[0])
    np.testing.assert_array_equal(frozen.initial_values(read_only(ids.hash64())), writable.initial_values(ids.hash64()))


def test_gradients_that_overflow_float32_are_refused_before_any_change() -> None:
    table = Table(TableSpec("t", 4, scalars=1, key_type="int"))
    table.push(Keys(ints=np.arange(3)), grads_for(3, 5), 1, 0.0)
    before = table.pull(Keys(ints=np.arange(3)))[0]
    with pytest.raises(ValueError, match="infinite"):
        table.push(Keys(ints=np.arange(3)), np.full((3, 5), 1e39), 2, 0.0)
    np.testing.assert_array_equal(table.pull(Keys(ints=np.arange(3)))[0], before)


def test_first_push_keeps_admission_rejects_out() -> None:
    """Ids admission keeps out get no row, while the admitted new ids beside them are updated."""
    table = Table(TableSpec("t", 2, key_type="str", min_count=2))
    table.push(as_keys(["x"]), np.ones((1, 2), np.float32), 1, 0.0)
    table.push(as_keys(["x", "y"]), np.ones((2, 2), np.float32), 2, 0.0)
    values, found = table.pull(as_keys(["x", "y"]))
    assert found.tolist() == [True, False]
    start = table.initial_values(as_keys(["x"]).hash64())[0]
    np.testing.assert_allclose(values[0], start - 0.01 / (1 + 1e-10), rtol=1e-6)
