"""The real server process over loopback: calls, tokens, concurrency, restarts, shards, metrics."""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from streamrec.param_server.client import ParamClient, ParamServerError
from streamrec.param_server.routing import shard_of
from tests.param_server.conftest import ServerProcess, StartServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_trainer_round_trip(client: ParamClient) -> None:
    """Two tables in one push with meta and an event count; pull mask; errors surface clearly."""
    for name in ("users", "items"):
        client.create_table(name, 8, scalars=1, optimizer="sgd", lr=0.007, scalar_lr=0.005)
    assert client.create_table("users", 8, scalars=1, optimizer="sgd", lr=0.007, scalar_lr=0.005)["rows"] == 0
    with pytest.raises(ParamServerError, match="different spec"):
        client.create_table("users", 16)
    before = client.pull("users", ["u1", "u2"])
    assert not before.found.any() and before.vectors.shape == (2, 8) and before.scalars.shape == (2, 1)
    grads = np.ones((3, 9), np.float32)
    client.push(
        {"users": (["u1", "u1", "u2"], grads), "items": (["i1", "i2", "i3"], (grads[:, :8], grads[:, 8]))},
        meta={"offsets": {"events/0": 41}, "applied": 3},
        events=3,
    )
    after = client.pull("users", ["u1", "u2", "u3"])
    assert after.found.tolist() == [True, True, False]
    assert after.scalars[:, 0].tolist() == pytest.approx([-0.01, -0.005, 0.0])
    assert client.applied_events() == 3 and client.get_meta()[0]["meta"]["offsets"] == {"events/0": 41}
    assert client.table_info("items")["rows"] == 3
    with pytest.raises(ParamServerError, match="no table"):
        client.pull("nope", ["x"])
    with pytest.raises(ParamServerError, match="shape"):
        client.push({"users": (["u1"], np.ones((1, 3), np.float32))})
    assert client.pull("users", ["u1"]).found[0]  # the connection survives errors


def test_assign_blobs_and_drop(client: ParamClient) -> None:
    client.create_table("items", 4, key_type="int")
    ids = np.arange(1000) * 13
    vectors = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
    client.assign("items", ids, vectors)
    assert np.array_equal(client.pull("items", ids).values, vectors)
    version = client.put_blob("neighbours.npz", b"\x01" * 100_000)
    blob = client.get_blob("neighbours.npz")
    assert blob.data == b"\x01" * 100_000 and blob.version == version
    assert client.get_blob("neighbours.npz", since=version) is None
    assert client.blobs() == {"neighbours.npz": version}
    assert client.drop_table("items") and not client.drop_table("items")
    client.create_table("items", 4, key_type="int")
    assert client.table_info("items")["rows"] == 0


def test_a_conditional_blob_put_never_overwrites_a_put_it_did_not_see(client: ParamClient) -> None:
    """`expect`: the version the writer read (0: none). A put made in between wins, the late one is
    refused and stores nothing; `blob_version` reads the version without the bytes."""
    assert client.blob_version("catalogue") is None
    first = client.put_blob("catalogue", b"mine", expect=0)
    with pytest.raises(ParamServerError) as refused:
        client.put_blob("catalogue", b"late", expect=0)
    assert refused.value.kind == "BlobConflict"
    between = client.put_blob("catalogue", b"theirs")  # unconditional, like `catalogue publish` used to be
    with pytest.raises(ParamServerError, match="BlobConflict"):
        client.put_blob("catalogue", b"late", expect=first)
    assert client.get_blob("catalogue").data == b"theirs" and client.blob_version("catalogue") == between
    assert client.put_blob("catalogue", b"next", expect=between) > between
    with pytest.raises(ParamServerError, match="TypeError"):
        client._exchange(0, {"op": "put_blob", "name": "catalogue", "expect": "1"}, {"data": np.zeros(1, np.uint8)})


def test_assign_only_new_never_overwrites_a_row(start_server: StartServer) -> None:
    """Cold-start seeding: rows that exist (trained meanwhile) keep their values, new string ids get
    the given values, on both shards of a two-shard server; a plain assign still replaces."""
    servers = [start_server("--no-checkpoints", "--shard", str(s), "--num-shards", "2") for s in range(2)]
    with ParamClient([s.address for s in servers]) as client:
        client.create_table("bpr_items", 4, scalars=1, optimizer="sgd", lr=1.0)
        trained = [f"item:{n}" for n in range(20)]
        client.push({"bpr_items": (trained, np.ones((20, 5), np.float32))})
        before = client.pull("bpr_items", trained)
        assert before.found.all()
        new = [f"new-{n} é" for n in range(30)]
        ids = trained[::2] + new + trained[1::2]
        seeded = np.arange(len(ids) * 5, dtype=np.float32).reshape(len(ids), 5) + 100
        versions = client.assign("bpr_items", ids, seeded[:, :4], seeded[:, 4:], only_new=True)
        assert sorted(versions) == [0, 1]
        after = client.pull("bpr_items", trained)
        assert np.array_equal(after.values, before.values)  # untouched, byte for byte
        pulled = client.pull("bpr_items", new)
        assert pulled.found.all() and np.array_equal(pulled.values, seeded[10:40])
        assert client.table_info("bpr_items")["rows"] == 50
        client.assign("bpr_items", new[:3], np.zeros((3, 4), np.float32), np.zeros((3, 1), np.float32), only_new=True)
        assert np.array_equal(client.pull("bpr_items", new[:3]).values, seeded[10:13])  # seeded rows exist now too
        client.assign("bpr_items", new[:1], np.zeros((1, 4), np.float32), np.zeros((1, 1), np.float32))
        assert not client.pull("bpr_items", new[:1]).values.any()  # the default still replaces


def test_token_enforced(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("--no-checkpoints", token="s3cret")
    with pytest.raises(ParamServerError, match="Unauthorized"):
        ParamClient([server.address]).info()
    with pytest.raises(ParamServerError, match="Unauthorized"):
        ParamClient([server.address], token="wrong").info()
    with ParamClient([server.address], token="s3cret") as good:
        assert good.info()[0]["shard"] == 0


def test_many_concurrent_clients(client: ParamClient, server: ServerProcess) -> None:
    client.create_table("t", 4, key_type="int", optimizer="sgd", lr=1.0)
    client.push({"t": (np.arange(100), np.zeros((100, 4), np.float32))})
    start = client.pull("t", np.arange(100)).values
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            with ParamClient([server.address]) as own:
                for _ in range(30):
                    own.push({"t": (np.arange(100), np.full((100, 4), -1.0, np.float32))}, events=1)
                    assert own.pull("t", np.arange(100)).found.all()
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert np.allclose(client.pull("t", np.arange(100)).values, start + 12 * 30)
    assert client.applied_events() == 360


def test_restart_restores_checkpoint_and_resets_old_readers(start_server: StartServer, tmp_path: Path) -> None:
    args = ("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0")
    first = start_server(*args)
    ids = [f"user{i}" for i in range(5000)]
    with ParamClient([first.address]) as c:
        c.create_table("users", 16, scalars=1, min_count=2)
        grads = np.random.default_rng(1).normal(size=(5000, 17)).astype(np.float32)
        c.push({"users": (ids, grads)}, meta={"offsets": [1, 2]}, events=5000)
        c.push({"users": (ids[:3000], grads[:3000])}, meta={"offsets": [3, 4]}, events=3000)
        c.put_blob("w", b"abc")
        state = c.pull("users", ids)
        old = c.delta("users")
    assert "checkpoint" in first.stop()  # SIGTERM wrote the final checkpoint
    second = start_server(*args)
    assert second.ready["restored"]
    with ParamClient([second.address]) as c:
        again = c.pull("users", ids)
        assert again.found.sum() == 3000 and np.array_equal(again.values, state.values)
        assert c.get_meta()[0]["meta"] == {"offsets": [3, 4]} and c.applied_events() == 8000
        assert c.get_blob("w").data == b"abc"
        assert c.delta("users", old.version).full  # versions of the old process are not trusted
        c.push({"users": (ids[4000:4001], grads[:1])})  # second sighting: admitted now
        assert c.pull("users", ids[4000:4001]).found[0]


def test_corrupt_checkpoint_skipped_at_start(start_server: StartServer, tmp_path: Path) -> None:
    args = ("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0")
    first = start_server(*args)
    with ParamClient([first.address]) as c:
        c.create_table("t", 4)
        c.push({"t": (["a"], np.ones((1, 4), np.float32))})
        c.checkpoint()
        c.push({"t": (["b"], np.ones((1, 4), np.float32))})
    first.stop()
    newest = sorted((tmp_path / "ckpt" / "shard-0-of-1").glob("*.srps"))[-1]
    newest.write_bytes(newest.read_bytes()[:-10])
    second = start_server(*args)
    assert len(second.ready["rejected_checkpoints"]) == 1
    with ParamClient([second.address]) as c:
        assert c.pull("t", ["a", "b"]).found.tolist() == [True, False]


def test_shards_route_stably_across_restarts(start_server: StartServer, tmp_path: Path) -> None:
    def start_shards() -> list[ServerProcess]:
        return [
            start_server("--shard", str(i), "--num-shards", "2", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0")
            for i in range(2)
        ]

    ids = [f"item{i}" for i in range(4000)]
    # the routing's golden values are in test_reshard.py
    servers = start_shards()
    with ParamClient([s.address for s in servers]) as c:
        c.create_table("items", 8)
        c.push({"items": (ids, np.ones((4000, 8), np.float32))}, meta={"step": 1}, events=4000)
        values = c.pull("items", ids).values
        per_shard = [info["tables"][0]["rows"] for info in c.info()]
        expected = np.bincount(shard_of(ids, 2), minlength=2).tolist()
        assert per_shard == expected and min(per_shard) > 1500
        assert [m["meta"] for m in c.get_meta()] == [{"step": 1}, {"step": 1}]
        delta = c.delta("items")
        assert len(delta.ids) == 4000 and len(delta.version) == 2
    for server in servers:
        server.stop()
    servers = start_shards()
    with ParamClient([s.address for s in servers]) as c:
        again = c.pull("items", ids)
        assert again.found.all() and np.array_equal(again.values, values)
        assert c.applied_events() == 4000
    with pytest.raises(ParamServerError, match="Misconfigured"):
        ParamClient([servers[1].address, servers[0].address]).pull("items", ids)


def test_client_reconnects_after_restart(start_server: StartServer, tmp_path: Path) -> None:
    port = free_port()
    args = ("--port", str(port), "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0")
    first = start_server(*args)
    c = ParamClient([first.address], retries=5)
    c.create_table("t", 2)
    first.stop()
    start_server(*args)
    assert c.table_info("t")["rows"] == 0  # same client object, new connection
    c.close()


def test_metrics_endpoint(start_server: StartServer) -> None:
    port = free_port()
    server = start_server("--no-checkpoints", "--metrics-port", str(port))
    with ParamClient([server.address]) as c:
        c.create_table("users", 4)
        c.push({"users": (["a", "b"], np.ones((2, 4), np.float32))})
        c.pull("users", ["a"])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in (
        'streamrec_param_server_table_rows{table="users"} 2.0',
        'streamrec_param_server_admitted_total{table="users"} 2.0',
        'streamrec_param_server_request_seconds_count{op="push"} 1.0',
        'streamrec_param_server_request_rows_sum{op="pull"} 1.0',
        "streamrec_param_server_version ",
        "streamrec_param_server_checkpoint_age_seconds -1.0",
    ):
        assert line in text, line


def test_table_metrics_follow_a_refits_logical_tables_and_counters_never_go_down(start_server: StartServer) -> None:
    """A refit keeps its tables as versions (`refit_x_items.v<N>-<token>`, streamrec.param_server.
    table_alias) and drops the old ones: per-table series are summed under the logical name (one
    series, not one per refit), and a dropped version's counts stay in the counter, which would
    otherwise fall at every refit and read as a reset to Prometheus (a spike in rate())."""
    port = free_port()
    server = start_server("--no-checkpoints", "--metrics-port", str(port))

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line.startswith(("streamrec_param_server_table_rows{", "streamrec_param_server_admitted_total{"))}

    def version(c: ParamClient, name: str, rows: int) -> None:
        c.create_table(name, 2)
        c.push({name: ([f"k{i}" for i in range(rows)], np.ones((rows, 2), np.float32))})

    rows, admitted = ('streamrec_param_server_table_rows{table="refit_x_items"}',
                      'streamrec_param_server_admitted_total{table="refit_x_items"}')
    with ParamClient([server.address]) as c:
        version(c, "refit_x_items.v1-aa", 100)
        version(c, "refit_x_items.v2-bb", 100)
        first = scrape()
        assert first[rows] == 200 and first[admitted] == 200
        assert not any(".v1-" in name or ".v2-" in name for name in first)
        c.drop_table("refit_x_items.v1-aa")
        version(c, "refit_x_items.v3-cc", 100)
        second = scrape()
        assert second[rows] == 200 and second[admitted] == 300
        c.drop_table("refit_x_items.v2-bb")
        c.drop_table("refit_x_items.v3-cc")
        assert scrape()[admitted] == 300  # no version left: the series stays, and does not fall
