"""String ids as words, and the string-key table against a dict: collisionless under inserts,
lookups and deletes with adversarial ids, also when every 64-bit hash collides."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrec.param_server.keys import MAX_KEY_BYTES, Keys, KeyWords, as_keys
from streamrec.param_server.specs import TableSpec
from streamrec.param_server.table import Table

MASK = (1 << 64) - 1
SEED = 0x9E3779B97F4A7C15


def mix64_reference(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def hash_reference(data: bytes) -> int:
    """The documented string hash, one id at a time: shard routing and checkpoints rely on it."""
    h = mix64_reference(len(data) ^ SEED)
    for start in range(0, len(data), 8):
        h = mix64_reference(h ^ int.from_bytes(data[start : start + 8].ljust(8, b"\0"), "little"))
    return h


ADVERSARIAL = ["", ":", "a:b", "a", "a\x00", "\x00", "\x00" * 8, "\x00" * 9, "é", "e\u0301", "日本語:ü", "x" * 7, "x" * 8,
               "x" * 9, "u123456", "u123456:", ":u123456", "y" * 1000, "y" * 999 + "z", "y" * 1000 + "\x00" * 24]
ids_strategy = st.one_of(st.sampled_from(ADVERSARIAL), st.text(max_size=40), st.text(alphabet=":\x00a", max_size=20))


def test_hash_matches_the_reference_on_adversarial_and_10kb_ids() -> None:
    ids = ADVERSARIAL + ["k" * 10_240, "k" * 10_239 + "\x00", "🙂" * 2560]
    data = [i.encode() for i in ids]
    words = KeyWords.of(np.frombuffer(b"".join(data), np.uint8), np.cumsum([0] + [len(d) for d in data]))
    assert words.hash64().tolist() == [hash_reference(d) for d in data]
    picked = np.array([len(ids) - 1, 0, 4, 3, len(ids) - 3])
    assert words.take(picked).hash64().tolist() == [hash_reference(data[i]) for i in picked]
    same = words.equal(np.arange(len(ids)), words.words, words.starts, words.lengths)
    assert same.all()
    shifted = words.equal(np.arange(1, len(ids)), words.words, words.starts[:-1], words.lengths[:-1])
    assert not shifted.any()  # every id differs from its neighbour, "a" from "a\0" included


def test_ids_over_the_limit_are_refused() -> None:
    with pytest.raises(ValueError, match="bytes long"):
        as_keys(["k" * (MAX_KEY_BYTES + 1)])


@given(st.lists(ids_strategy, max_size=60))
@settings(max_examples=200, deadline=None)
def test_hash_property(ids: list[str]) -> None:
    keys = as_keys(ids) if ids else Keys.empty("str")
    assert keys.hash64().tolist() == [hash_reference(i.encode()) for i in ids]
    key64, homes = Table(TableSpec("t", 1, key_type="str"))._hashes(keys.words())  # the server's compiled pass
    assert key64.tolist() == [hash_reference(i.encode()) for i in ids]


operations = st.lists(
    st.tuples(st.sampled_from(["assign", "lookup", "delete"]), st.lists(ids_strategy, min_size=1, max_size=30)),
    min_size=1,
    max_size=25,
)


def check_against_dict(ops: list[tuple[str, list[str]]]) -> None:
    table = Table(TableSpec("t", 1, key_type="str", max_rows=4096))
    reference: dict[str, float] = {}
    for step, (op, ids) in enumerate(ops, start=1):
        keys = as_keys(ids)
        if op == "assign":  # repeated ids in one batch get the same value
            values = np.array([[step * 1000 + len(i)] for i in ids], np.float32)
            table.assign(keys, values, step, 0.0)
            reference.update((i, float(v[0])) for i, v in zip(ids, values))
        elif op == "delete":
            rows = table.lookup(keys)
            table.evict(np.unique(rows[rows >= 0]), step)
            for i in ids:
                reference.pop(i, None)
        rows = table.lookup(keys)
        assert [r >= 0 for r in rows] == [i in reference for i in ids]
        known = sorted(reference)
        if known:
            every = table.lookup(as_keys(known))
            assert (every >= 0).all() and np.unique(every).size == len(known)  # one row per distinct id
            assert table.keys_of(every).to_list() == known
            assert table.values[every, 0].tolist() == [reference[i] for i in known]
        assert table.live_rows == len(reference)


@given(operations)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_table_equals_a_dict(ops: list[tuple[str, list[str]]]) -> None:
    check_against_dict(ops)


@given(ops=operations)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_table_equals_a_dict_when_every_hash_collides(ops: list[tuple[str, list[str]]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Three 64-bit hashes and three homes for all ids: only the exact compare of the ids' words
    tells them apart."""
    monkeypatch.setattr(Table, "_hashes", lambda self, words: ((words.lengths % 3).astype(np.uint64),
                                                               (words.lengths % 3).astype(np.uint64)))
    check_against_dict(ops)


def test_restore_lays_out_an_old_byte_packed_arena_as_words() -> None:
    """Checkpoints written before the word layout packed ids byte by byte; they still load."""
    ids = ["a", "bcdefghij", "", "k" * 17, "é:ü"]
    table = Table(TableSpec("t", 2, key_type="str"))
    table.assign(as_keys(ids), np.arange(10, dtype=np.float32).reshape(5, 2), 1, 0.0)
    header, arrays = table.checkpoint_view(threading.Lock())
    arrays["block"] = np.concatenate(list(arrays["block"].chunks()))
    table.end_checkpoint()
    packed = as_keys(ids)
    rows = table.lookup(packed)
    arrays["arena"] = packed.blob.copy()
    arrays["row_key_start"] = arrays["row_key_start"].copy()
    arrays["row_key_start"][rows] = packed.offsets[:-1]
    restored = Table.restore(header, arrays, 2)
    found = restored.lookup(as_keys(ids))
    assert (found == rows).all()
    assert restored.keys_of(found).to_list() == ids
    assert restored.pull(as_keys(ids))[0].tolist() == np.arange(10).reshape(5, 2).tolist()
    restored.assign(as_keys(["new", "a"]), np.ones((2, 2), np.float32), 3, 0.0)
    assert restored.keys_of(restored.lookup(as_keys(["new", "a"]))).to_list() == ["new", "a"]


def test_evictions_compact_the_arena_and_ids_stay_exact() -> None:
    """Evicted ids leave garbage words; past half the arena it is rewritten with the live ids only."""
    table = Table(TableSpec("t", 1, key_type="str", max_rows=1 << 20))
    ids = [f"id:{i:012d}" for i in range(200_000)]  # 15 bytes: two words each
    table.assign(as_keys(ids), np.arange(len(ids), dtype=np.float32)[:, None], 1, 0.0)
    used = table.arena_used
    kept = ids[::10]
    gone = np.setdiff1d(np.arange(len(ids)), np.arange(0, len(ids), 10))
    table.evict(table.lookup(as_keys([ids[i] for i in gone])), 2)
    assert table.arena_used < used / 2 and table.arena_garbage == 0  # compacted
    rows = table.lookup(as_keys(kept))
    assert (rows >= 0).all() and table.keys_of(rows).to_list() == kept
    assert table.values[rows, 0].tolist() == list(range(0, len(ids), 10))
    assert (table.lookup(as_keys(ids[1:10])) == -1).all()
    table.assign(as_keys(["id:new", ids[1]]), np.ones((2, 1), np.float32), 3, 0.0)  # rows reused after compaction
    assert table.keys_of(table.lookup(as_keys(["id:new", ids[1], kept[-1]]))).to_list() == ["id:new", ids[1], kept[-1]]
