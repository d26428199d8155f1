"""Resharding: rendezvous routing moves few ids, and `param-server reshard` re-splits real servers'
checkpoints with every row, optimiser state, watermark, count and blob intact (issue 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamrec.param_server.checkpoint import snapshot, write
from streamrec.param_server.client import OffsetsRefused, ParamClient, ParamServerError
from streamrec.param_server.keys import Keys
from streamrec.param_server.routing import shard_of
from streamrec.param_server.specs import OptimizerSpec, TableSpec
from streamrec.param_server.store import ParamStore
from tests.param_server.conftest import ServerProcess, StartServer

P0, P1 = "events/0", "events/1"
USERS = [f"user:{i}:{'x' * (i % 40)}" for i in range(3000)]  # ':' and long ids, on every shard
ITEMS = np.arange(1, 2001, dtype=np.int64) * 7919


def test_routing_is_fixed_and_balanced() -> None:
    # golden values: the placement must never change between processes or releases (a change
    # strands checkpointed rows); changing it needs a routing name and a reshard path
    assert shard_of(["a", "b", "item0", "u42", "x" * 300], 2).tolist() == [0, 0, 0, 1, 0]
    assert shard_of(["a", "b", "item0", "u42"], 3).tolist() == [0, 0, 0, 1]
    assert shard_of([0, 1, 2, 2**40], 4).tolist() == [3, 0, 3, 0]
    assert shard_of(["a", "b"], 1).tolist() == [0, 0]
    ids = [f"u{i}" for i in range(60000)]
    for n in (2, 3, 5):
        shares = np.bincount(shard_of(ids, n), minlength=n) / len(ids)
        assert np.abs(shares - 1 / n).max() < 0.01


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_adding_a_shard_moves_about_one_in_n_plus_one(n: int) -> None:
    """Consistent hashing: only ids the new shard wins move, about 1/(n+1) of them (a modulo would
    move n/(n+1)); removing the last shard moves only its own ids."""
    ids = [f"item-{i}" for i in range(40000)]
    before, after = shard_of(ids, n), shard_of(ids, n + 1)
    moved = before != after
    assert abs(moved.mean() - 1 / (n + 1)) < 0.015
    assert (after[moved] == n).all()  # every moved id went to the new shard
    assert np.array_equal(before, shard_of(ids, n))  # and the old layout is reproducible


def grads(n: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def start_shards(start_server: StartServer, ckpt: Path, n: int) -> list[ServerProcess]:
    return [start_server("--shard", str(i), "--num-shards", str(n), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "0")
            for i in range(n)]


def reshard(src: Path, dst: Path, shards: int, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "STREAMREC_PARAM_SERVER_TOKEN"}
    streamrec = Path(sys.executable).with_name("streamrec")  # the installed console script, as a user runs it
    return subprocess.run([str(streamrec), "param-server", "reshard", "--from", str(src), "--to", str(dst),
                           "--shards", str(shards), *extra], capture_output=True, text=True, env=env, timeout=120)


def fill(c: ParamClient) -> None:
    """Two tables (string ids with adagrad and a scalar; int ids behind an admission filter), ranged
    pushes with counts, meta and events, and blobs."""
    c.create_table("users", 4, scalars=1, optimizer="adagrad", lr=0.1)
    c.create_table("items", 3, key_type="int", optimizer="sgd", lr=0.5, min_count=2)
    c.claim([P0, P1])
    c.push({"users": (USERS, grads(3000, 5, 1)), "items": (ITEMS, grads(2000, 3, 2))}, meta={"offsets": {"0": 30}},
           events=30, ranges={P0: (0, 30), P1: (0, 4)}, item_counts=(["a", "b"], np.array([25, 5])))
    c.push({"users": (USERS[:1500], grads(1500, 5, 3)), "items": (ITEMS[:1000], grads(1000, 3, 4))},
           events=10, ranges={P0: (30, 40)}, item_counts=(["a"], np.array([10])))
    c.push({"items": (np.array([5, 6], np.int64), grads(2, 3, 5))}, ranges={P1: (4, 6)})  # seen once: not admitted
    for i in range(6):
        c.put_blob(f"model/{i}", f"artefact {i}".encode() * 50)


def test_reshard_two_shards_into_three_keeps_everything(start_server: StartServer, tmp_path: Path) -> None:
    old_dir, new_dir = tmp_path / "two", tmp_path / "three"
    old = start_shards(start_server, old_dir, 2)
    with ParamClient([s.address for s in old]) as c:
        fill(c)
        users, items = c.pull("users", USERS).values, c.pull("items", ITEMS).values
        counts, events = c.item_event_counts()[0], c.applied_events()
        assert c.watermarks() == [{P0: 40, P1: 6}] * 2
    for server in old:
        server.stop()  # final checkpoints

    done = reshard(old_dir, new_dir, 3)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"] == 4000 and report["watermarks"] == {P0: 40, P1: 6} and report["blobs"] == 6
    assert report["tables"]["users"]["rows"] == 3000 and sum(report["tables"]["users"]["rows_per_shard"]) == 3000
    admitted = ITEMS[:1000]  # seen twice; the others once, below the admission filter's min_count
    assert report["tables"]["items"]["rows_per_shard"] == np.bincount(shard_of(admitted, 3), minlength=3).tolist()
    expected_moved = int((shard_of(USERS, 2) != shard_of(USERS, 3)).sum() + (shard_of(admitted, 2) != shard_of(admitted, 3)).sum())
    assert report["moved_rows"] == expected_moved and 0.28 < report["moved_fraction"] < 0.39  # about 1/3

    new = start_shards(start_server, new_dir, 3)
    with ParamClient([s.address for s in new]) as c:
        assert all(not s.ready["empty"] for s in new)
        assert np.array_equal(c.pull("users", USERS).values, users) and np.array_equal(c.pull("items", ITEMS).values, items)
        assert sum(t["rows"] for info in c.info() for t in info["tables"]) == 4000
        assert c.watermarks() == [{P0: 40, P1: 6}] * 3 and c.item_event_counts() == [counts] * 3
        assert c.applied_events() == events == 40
        assert [m["meta"] for m in c.get_meta()] == [{"offsets": {"0": 30}}] * 3
        assert all(c.get_blob(f"model/{i}").data == f"artefact {i}".encode() * 50 for i in range(6))
        # exactly once across the split: an applied range is skipped everywhere, the next one applies
        c.claim([P0, P1])
        assert c.push({"users": (USERS, grads(3000, 5, 1))}, ranges={P0: (30, 40)}).skipped == [0, 1, 2]
        with pytest.raises(OffsetsRefused, match="gap"):
            c.push({"users": (USERS, grads(3000, 5, 1))}, ranges={P0: (41, 50)})
        step = grads(3000, 5, 9)
        assert c.push({"users": (USERS, step)}, ranges={P0: (40, 50)}).applied == [0, 1, 2]
        after_split = c.pull("users", USERS).values
        # the admission sketches came along: ids seen once before are admitted at their second sighting
        assert not c.pull("items", ITEMS[1000:]).found.any()
        c.push({"items": (np.concatenate([ITEMS[1000:], [5, 6]]), grads(1002, 3, 5))}, ranges={P1: (6, 8)})
        assert c.pull("items", ITEMS[1000:]).found.all() and c.pull("items", [5, 6]).found.all()
    # the optimiser state came along too: the old layout, restarted, takes the same step to the same values
    for server in new:
        server.stop()
    old = start_shards(start_server, old_dir, 2)
    with ParamClient([s.address for s in old]) as c:
        c.claim([P0])
        c.push({"users": (USERS, step)}, ranges={P0: (40, 50)})
        np.testing.assert_array_equal(c.pull("users", USERS).values, after_split)


def test_reshard_refuses_shards_that_applied_different_events(start_server: StartServer, tmp_path: Path) -> None:
    old_dir = tmp_path / "two"
    old = start_shards(start_server, old_dir, 2)
    ids = [f"u{i}" for i in range(40)]
    with ParamClient([s.address for s in old]) as c:
        c.create_table("t", 4, optimizer="sgd", lr=1.0)
        c.push({"t": (ids, np.ones((40, 4), np.float32))}, ranges={P0: (0, 40)})
        bad = np.ones((40, 4), np.float32)
        bad[shard_of(ids, 2) == 0] = np.nan  # shard 0 refuses its part, shard 1 applies its own
        with pytest.raises(ParamServerError, match="NaN"):
            c.push({"t": (ids, bad)}, ranges={P0: (40, 80)})
        assert c.watermarks() == [{P0: 40}, {P0: 80}]
    for server in old:
        server.stop()
    refused = reshard(old_dir, tmp_path / "three", 3)
    assert refused.returncode == 1
    assert "events/0: shard 0 at 40, shard 1 at 80" in refused.stderr and "watermarks agree" in refused.stderr
    assert not list((tmp_path / "three").glob("shard-*"))  # nothing half-written


def test_a_modulo_routed_checkpoint_is_refused_at_start_and_migrated_by_reshard(start_server: StartServer, tmp_path: Path) -> None:
    """Checkpoints of the earlier `hash % n` routing hold rows where this release would not look: a
    shard refuses to start on them (instead of answering pulls with fresh rows), and a reshard to
    the same count lays them out anew."""
    old_dir = tmp_path / "modulo"
    spec = TableSpec(name="t", dim=2, key_type="str", optimizer=OptimizerSpec("sgd", 1.0), max_rows=1000)
    ids = [f"id{i}" for i in range(100)]
    for shard in range(2):  # the earlier layout, as a release before rendezvous routing wrote it
        store = ParamStore(shard, 2)
        store.create_table(spec)
        mine = ids[shard::2]
        store.push([("t", Keys.from_strings(mine), np.full((len(mine), 2), -float(shard + 1), np.float32))], ranges={P0: (0, 9)})
        taken = snapshot(store)
        del taken.header["routing"]
        (old_dir / f"shard-{shard}-of-2").mkdir(parents=True)
        write(old_dir / f"shard-{shard}-of-2" / f"ckpt-{store.version:020d}.srps", taken.header, taken.arrays)
        taken.release(store)
    with pytest.raises(RuntimeError, match="routed by 'modulo'.*param-server reshard"):
        start_server("--shard", "0", "--num-shards", "2", "--checkpoint-dir", str(old_dir))
    done = reshard(old_dir, tmp_path / "migrated", 2)
    assert done.returncode == 0, done.stderr
    new = start_shards(start_server, tmp_path / "migrated", 2)
    with ParamClient([s.address for s in new]) as c:
        rows = c.pull("t", ids)
        assert rows.found.all()
        # each row is its initial value (std 0.01) minus its one gradient (sgd, lr 1): the rows moved whole
        assert np.round(rows.values[:, 0]).tolist() == [1.0 if i % 2 == 0 else 2.0 for i in range(100)]
        assert c.watermarks() == [{P0: 9}] * 2


def test_reshard_explains_what_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no checkpoints" in reshard(tmp_path / "empty", tmp_path / "out", 2).stderr
    (tmp_path / "partial" / "shard-1-of-2").mkdir(parents=True)
    (tmp_path / "partial" / "shard-1-of-2" / "ckpt-1.srps").write_bytes(b"junk")
    assert "no checkpoint of shard(s) [0] of 2" in reshard(tmp_path / "partial", tmp_path / "out", 2).stderr


def test_a_reshard_killed_while_moving_shards_in_is_refused_at_start_and_finished_by_a_rerun(
        start_server: StartServer, tmp_path: Path) -> None:
    """The new shards are moved into --to one by one. Killed after the first move, the reshard
    left one shard of three: the other two started empty (their rows gone), and a rerun refused the
    directory as already holding checkpoints. Shards now refuse a target that still holds the
    staging folder, and a rerun does the whole reshard again from the untouched source."""
    old_dir, new_dir = tmp_path / "two", tmp_path / "three"
    old = start_shards(start_server, old_dir, 2)
    with ParamClient([s.address for s in old]) as c:
        fill(c)
        users = c.pull("users", USERS).values
    for server in old:
        server.stop()
    killed_after_first_move = (
        "import os, signal, sys\n"
        "from streamrec.app.cli import main\n"
        "real = os.replace\n"
        "def replace(a, b):\n"
        "    real(a, b)\n"
        f"    if os.path.dirname(str(b)) == {str(new_dir)!r}:  # a shard moved in, not a checkpoint written\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
        f"sys.argv = ['streamrec', 'param-server', 'reshard', '--from', {str(old_dir)!r}, '--to', {str(new_dir)!r}, "
        "'--shards', '3']\n"
        "main()\n")
    env = {k: v for k, v in os.environ.items() if k != "STREAMREC_PARAM_SERVER_TOKEN"}
    killed = subprocess.run([sys.executable, "-c", killed_after_first_move], capture_output=True, text=True, env=env,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert len(list(new_dir.glob("shard-*-of-3"))) == 1  # a partial layout
    with pytest.raises(RuntimeError, match="reshard that did not finish"):
        start_server("--shard", "1", "--num-shards", "3", "--checkpoint-dir", str(new_dir), "--checkpoint-every", "0")
    done = reshard(old_dir, new_dir, 3)
    assert done.returncode == 0, done.stderr
    new = start_shards(start_server, new_dir, 3)
    with ParamClient([s.address for s in new]) as c:
        assert all(not s.ready["empty"] for s in new)
        assert np.array_equal(c.pull("users", USERS).values, users)
