"""Exactly-once model state against real server processes: restart detection, the dedup rule,
fencing, per-item counts, checkpoint fallback and bounded tables with all-or-nothing pushes."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from streamrec.param_server.client import (
    Fenced,
    OffsetsRefused,
    ParamClient,
    ParamServerError,
    PushOutcome,
    ShardRestart,
)
from streamrec.param_server.local_store import LocalStore
from streamrec.param_server.routing import shard_of
from tests.param_server.conftest import ServerProcess, StartServer
from tests.param_server.test_server import free_port

P0, P1 = "events/0", "events/1"


def grads(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 4), value, np.float32)


def state(client: ParamClient, ids: list[str]) -> tuple:
    """Everything a push may change, to assert that a refused push changed nothing."""
    return (client.pull("t", ids).values.tobytes(), client.applied_events(), client.watermarks(),
            client.item_event_counts(), [m["meta"] for m in client.get_meta()])


@pytest.fixture
def shards(start_server: StartServer, tmp_path: Path) -> list[ServerProcess]:
    return [
        start_server("--shard", str(i), "--num-shards", "2", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0")
        for i in range(2)
    ]


def test_dedup_rule_applies_skips_and_refuses_on_every_shard(shards: list[ServerProcess]) -> None:
    ids = [f"u{i}" for i in range(40)]  # rows on both shards
    with ParamClient([s.address for s in shards]) as c:
        c.create_table("t", 4, optimizer="sgd", lr=1.0)
        first = c.push({"t": (ids, grads(40))}, meta={"step": 1}, events=40, ranges={P0: (0, 30), P1: (0, 10)},
                       item_counts=(["a", "b"], np.array([30, 10])))
        assert first == PushOutcome(applied=[0, 1], skipped=[])
        assert c.watermarks() == [{P0: 30, P1: 10}] * 2
        assert c.item_event_counts() == [{"a": 30, "b": 10}] * 2  # every shard counts every item
        applied = state(c, ids)
        # the same push again (a trainer replaying after a crash): skipped everywhere, nothing moves
        again = c.push({"t": (ids, grads(40))}, meta={"step": 1}, events=40, ranges={P0: (0, 30), P1: (0, 10)},
                       item_counts=(["a", "b"], np.array([30, 10])))
        assert again == PushOutcome(applied=[], skipped=[0, 1]) and state(c, ids) == applied
        # a range inside the applied part is a duplicate too
        assert c.push({"t": (ids, grads(40))}, ranges={P0: (10, 20)}).skipped == [0, 1]
        for ranges, why in (
            ({P0: (31, 40)}, "gap"),
            ({P0: (25, 40)}, "overlap"),
            ({P0: (30, 40), P1: (0, 10)}, "dup"),  # new mixed with an applied partition
            ({P0: (30, 40), P1: (12, 20)}, "gap"),
        ):
            with pytest.raises(OffsetsRefused, match=why) as refused:
                c.push({"t": (ids, grads(40, 5.0))}, meta={"step": 2}, events=40, ranges=ranges,
                       item_counts=(["a"], np.array([10])))
            assert refused.value.next_offsets == {p: {P0: 30, P1: 10}[p] for p in ranges}
            assert refused.value.kind == "offsets" and refused.value.outcome == PushOutcome([], [])
            assert state(c, ids) == applied
        # continuing exactly at the watermarks applies; an empty range of a new partition is new
        assert c.push({"t": (ids, grads(40))}, events=5, ranges={P0: (30, 35), P1: (10, 12), "events/2": (7, 7)}).applied == [0, 1]
        assert c.watermarks() == [{P0: 35, P1: 12, "events/2": 7}] * 2 and c.applied_events() == 45
        # pushes without ranges keep working as before (benchmarks, refit tools)
        assert c.push({"t": (ids, grads(40))}).applied == sorted(set(c.shard_of(ids).tolist()))


def test_partial_multi_shard_push_is_not_applied_twice(shards: list[ServerProcess]) -> None:
    """A push that only one shard applied (the other refused it) is pushed again: the shard that
    lacks it applies it, the one that has it skips it, and both shards' per-item counts end exact."""
    ids = [f"u{i}" for i in range(40)]
    on_shard_0 = shard_of(ids, 2) == 0
    with ParamClient([s.address for s in shards]) as c:
        c.create_table("t", 4, optimizer="sgd", lr=1.0)
        c.push({"t": (ids, grads(40))}, events=40, ranges={P0: (0, 40)}, item_counts=(["a"], np.array([40])))
        after_one = c.pull("t", ids).vectors
        bad = grads(40)
        bad[on_shard_0] = np.nan  # shard 0 refuses its part, shard 1 applies its own
        with pytest.raises(ParamServerError, match="NaN") as partial:
            c.push({"t": (ids, bad)}, events=40, ranges={P0: (40, 80)}, item_counts=(["a"], np.array([40])))
        assert partial.value.outcome == PushOutcome(applied=[1], skipped=[])
        assert c.watermarks() == [{P0: 40}, {P0: 80}]
        outcome = c.push({"t": (ids, grads(40))}, events=40, ranges={P0: (40, 80)}, item_counts=(["a"], np.array([40])))
        assert outcome == PushOutcome(applied=[0], skipped=[1])
        assert c.watermarks() == [{P0: 80}, {P0: 80}] and c.item_event_counts() == [{"a": 80}, {"a": 80}]
        assert c.applied_events() == 80
        assert np.allclose(c.pull("t", ids).vectors, after_one - 1.0)  # every row took exactly one more step


def test_fencing_survives_a_checkpoint_restore(start_server: StartServer, tmp_path: Path) -> None:
    port = free_port()
    args = ("--port", str(port), "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0")
    server = start_server(*args)
    old_owner, new_owner = ParamClient([server.address], retries=6), ParamClient([server.address], retries=6)
    old_owner.create_table("t", 4)
    assert old_owner.claim([P0]) == [{}]
    old_owner.push({"t": (["x"], grads(1))}, ranges={P0: (0, 5)})
    assert new_owner.claim([P0]) == [{P0: 5}]  # the rebalance moved the partition
    with pytest.raises(Fenced, match="newer claim") as fenced:
        old_owner.push({"t": (["x"], grads(1))}, ranges={P0: (5, 8)})
    assert fenced.value.next_offsets == {P0: 5} and fenced.value.kind == "fenced"
    assert new_owner.push({"t": (["x"], grads(1))}, ranges={P0: (5, 8)}).applied == [0]
    old_owner.push({"t": (["y"], grads(1))}, ranges={P1: (0, 1)})  # a partition it was never fenced on
    assert "checkpoint" in server.stop()
    start_server(*args)
    with pytest.raises(OffsetsRefused, match="restarted"):  # cut before the restart: cut it again
        new_owner.push({"t": (["x"], grads(1))}, ranges={P0: (8, 9)})
    with pytest.raises(Fenced):
        old_owner.push({"t": (["x"], grads(1))}, ranges={P0: (8, 9)})
    with pytest.raises(OffsetsRefused, match="restarted"):  # refused until the caller has seen the restart
        new_owner.push({"t": (["x"], grads(1))}, ranges={P0: (8, 9)})
    assert [r.empty for r in new_owner.take_restarts()] == [False]
    assert new_owner.push({"t": (["x"], grads(1))}, ranges={P0: (8, 9)}).applied == [0]
    assert new_owner.watermarks() == [{P0: 9, P1: 1}]
    old_owner.close()
    new_owner.close()


def test_restart_is_detected_and_counts_survive_the_checkpoint(start_server: StartServer, tmp_path: Path) -> None:
    port = free_port()
    ckpt = tmp_path / "ckpt"
    args = ("--port", str(port), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "0")
    first = start_server(*args)
    assert first.ready["empty"] is True
    c = ParamClient([first.address], retries=6)
    c.create_table("t", 4)
    c.push({"t": (["x", "y"], grads(2))}, events=2, ranges={P0: (0, 2)}, item_counts=(["i1", "i2"], np.array([1, 1])))
    assert c.take_restarts() == []  # the first contact is no restart
    c.checkpoint()
    c.push({"t": (["x"], grads(1))}, events=1, ranges={P0: (2, 3)}, item_counts=(["i1"], np.array([1])))  # lost below
    first.proc.kill()  # SIGKILL: no final checkpoint
    first.proc.communicate()
    second = start_server(*args)
    assert second.ready["empty"] is False and second.ready["restored"]
    assert c.watermarks() == [{P0: 2}] and c.item_event_counts() == [{"i1": 1, "i2": 1}] and c.applied_events() == 2
    (restart,) = c.take_restarts()
    assert restart == ShardRestart(0, first.ready["incarnation"], second.ready["incarnation"], False)
    assert c.take_restarts() == []
    # the trainer rewinds to the shard's watermark and learns the lost event again
    assert c.push({"t": (["x"], grads(1))}, events=1, ranges={P0: (2, 3)}, item_counts=(["i1"], np.array([1]))).applied == [0]
    assert c.item_event_counts() == [{"i1": 2, "i2": 1}] and c.applied_events() == 3
    second.proc.kill()
    second.proc.communicate()
    shutil.rmtree(ckpt)
    third = start_server(*args)
    assert third.ready["empty"] is True and third.ready["restored"] is None
    assert c.watermarks() == [{}] and c.applied_events() == 0
    assert c.take_restarts() == [ShardRestart(0, second.ready["incarnation"], third.ready["incarnation"], True)]
    c.close()


def test_a_push_cut_before_an_empty_restart_is_refused(start_server: StartServer, tmp_path: Path) -> None:
    """Otherwise the empty shard would take the push's offsets as its first range and later skip the
    earlier offsets the trainer rewinds to."""
    port = free_port()
    args = ("--port", str(port), "--no-checkpoints")
    first = start_server(*args)
    c = ParamClient([first.address], retries=6)
    c.create_table("t", 4)
    c.push({"t": (["x"], grads(1))}, ranges={P0: (0, 100)})
    first.proc.kill()
    first.proc.communicate()
    start_server(*args)
    with pytest.raises(OffsetsRefused, match="restarted") as refused:
        c.push({"t": (["x"], grads(1))}, ranges={P0: (100, 200)})
    assert refused.value.next_offsets == {}
    assert [r.empty for r in c.take_restarts()] == [True]
    c.create_table("t", 4)
    assert c.push({"t": (["x"], grads(1))}, ranges={P0: (0, 100)}).applied == [0]  # rewound to the start
    c.close()


def test_corrupt_newest_checkpoint_falls_back_at_start(start_server: StartServer, tmp_path: Path) -> None:
    args = ("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0", "--keep-checkpoints", "2")
    first = start_server(*args)
    with ParamClient([first.address]) as c:
        c.create_table("t", 4)
        for step in range(3):
            c.push({"t": ([f"r{step}"], grads(1))}, ranges={P0: (step, step + 1)})
            c.checkpoint()
    first.stop()  # nothing changed since the last checkpoint: no new file
    files = sorted((tmp_path / "ckpt" / "shard-0-of-1").glob("*.srps"))
    assert len(files) == 2
    files[-1].write_bytes(files[-1].read_bytes()[:-10])
    second = start_server(*args)
    assert len(second.ready["rejected_checkpoints"]) == 1 and second.ready["restored"] == str(files[0])
    with ParamClient([second.address]) as c:
        assert c.watermarks() == [{P0: 2}]
        assert c.pull("t", ["r0", "r1", "r2"]).found.tolist() == [True, True, False]


def test_bounded_table_evicts_and_pushes_are_all_or_nothing(start_server: StartServer) -> None:
    metrics_port = free_port()
    server = start_server("--no-checkpoints", "--max-rows", "50", "--metrics-port", str(metrics_port))
    with ParamClient([server.address]) as c:
        assert c.create_table("t", 4)["spec"]["max_rows"] == 50  # the server's default
        c.create_table("other", 4, max_rows=1000)
        c.push({"t": ([f"old{i}" for i in range(50)], grads(50))}, event_time=100.0)
        c.push({"t": ([f"old{i}" for i in range(10)], grads(10))}, event_time=200.0)
        c.push({"t": ([f"new{i}" for i in range(20)], grads(20))}, event_time=300.0)
        found = c.pull("t", [f"old{i}" for i in range(50)]).found
        assert found[:10].all() and found[10:].sum() == 20  # the 20 least recently updated went
        assert c.table_info("t")["evicted_for_room"] == 20 and c.table_info("t")["rows"] == 50
        before = state(c, ["new0", "old0"])
        other_before = c.pull("other", ["a"]).values.tobytes()
        bad = grads(2)
        bad[0, 0] = np.nan
        with pytest.raises(ParamServerError, match="NaN"):
            c.push({"other": (["a"], grads(1)), "t": (["new0", "z"], bad)}, ranges={P0: (0, 5)},
                   item_counts=(["i"], np.array([5])))
        with pytest.raises(ParamServerError, match="max_rows=50") as full:
            c.push({"other": (["a"], grads(1)), "t": ([f"huge{i}" for i in range(51)], grads(51))}, ranges={P0: (0, 5)})
        assert full.value.kind == "TableFullError"
        assert state(c, ["new0", "old0"]) == before and c.pull("other", ["a"]).values.tobytes() == other_before
        assert not c.pull("other", ["a"]).found[0]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert 'streamrec_param_server_evictions_total{table="t"} 20.0' in text
    assert "streamrec_param_server_started_empty 1.0" in text


def test_local_store_follows_the_same_rule() -> None:
    store = LocalStore()
    store.create_table("t", 4)
    assert store.claim([P0]) == [{}]
    assert store.push({"t": (["a"], grads(1))}, ranges={P0: (0, 3)}, item_counts=(["i"], np.array([3]))) == PushOutcome([0], [])
    assert store.push({"t": (["a"], grads(1))}, ranges={P0: (0, 3)}) == PushOutcome([], [0])
    with pytest.raises(OffsetsRefused) as refused:
        store.push({"t": (["a"], grads(1))}, ranges={P0: (5, 6)})
    assert refused.value.next_offsets == {P0: 3}
    assert store.watermarks() == [{P0: 3}] and store.item_event_counts() == [{"i": 3}] and store.take_restarts() == []


def test_a_pull_says_which_offsets_its_rows_have_learned(shards: list[ServerProcess]) -> None:
    """Serving's read-your-writes compares a user's newest event with these: read on each shard
    under the lock that applies pushes, and the lowest over the shards a pull reached."""
    ids = [f"u{i}" for i in range(40)]
    with ParamClient([s.address for s in shards]) as c:
        c.create_table("t", 4, optimizer="sgd", lr=1.0)
        assert c.pull("t", ids).learned is None and c.pull("t", ids, learned=True).learned == {}
        c.push({"t": (ids, grads(40))}, ranges={P0: (0, 30), P1: (0, 10)})
        assert c.pull("t", ids, learned=True).learned == {P0: 30, P1: 10}
        one = ids[:1]  # one shard's row
        c.push({"t": (one, grads(1))}, ranges={P0: (30, 31)})  # every shard receives a ranged push
        assert c.pull("t", one, learned=True).learned == {P0: 31, P1: 10}
        assert c.pull("t", ids, learned=True).learned == {P0: 31, P1: 10}
