"""Values a peer can send that every frame check passes, but that the server could not keep:
meta its checkpoint cannot write, epochs past 64 bits, gradients whose sum or square overflows,
item counts that add up past the cap; and what an operator does that a checkpoint must record
(dropping a table). Each was found by a hostile-peer hunt against a real server process: the first
two stopped the server at its next checkpoint, losing what it held since the one before."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from streamrec.param_server import protocol
from streamrec.param_server.client import ParamClient, ParamServerError
from tests.param_server.conftest import ServerProcess, StartServer
from tests.param_server.test_fuzz import frame


def ask_raw(address: str, head: bytes, body: bytes = b"") -> dict:
    """One frame of these header bytes on a fresh connection (no token), the reply's header."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(frame({"op": "hello", "arrays": []}))
        assert protocol.recv(sock).header["ok"]
        sock.sendall(protocol.PREFIX.pack(protocol.MAGIC, len(head), len(body)) + head + body)
        reply = protocol.recv(sock)
    assert reply is not None, "the server closed the connection without a reply"
    return reply.header


def ask(address: str, header: dict) -> dict:
    return ask_raw(address, orjson.dumps({**header, "arrays": []}))


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.fixture
def checkpointing(start_server: StartServer, tmp_path: Path) -> ServerProcess:
    return start_server("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0.2")


@pytest.mark.parametrize("depth", [300, 254, 253, 65])  # the checkpoint and the meta reply nest it further
def test_meta_the_checkpoint_cannot_write_is_refused_and_the_server_keeps_checkpointing(
        checkpointing: ServerProcess, depth: int) -> None:
    head = orjson.dumps({"op": "push", "tables": [], "meta": {"a": 1}, "arrays": []})
    deep = head.replace(b'{"a":1}', b'{"k":' * depth + b"1" + b"}" * depth)  # orjson writes 255 levels at most
    reply = ask_raw(checkpointing.address, deep)
    assert not reply["ok"] and "meta cannot be stored" in reply["error"]["message"], reply
    with ParamClient([checkpointing.address]) as client:
        client.push({}, meta={"good": 1})
        time.sleep(1.0)  # five checkpoint periods
        assert ask(checkpointing.address, {"op": "meta"})["ok"]
    assert checkpointing.proc.poll() is None
    assert "Traceback" not in checkpointing.stop()  # and its final checkpoint exits 0


def test_epochs_and_offsets_past_64_bits_are_refused(checkpointing: ServerProcess) -> None:
    for ranges, epochs in (({"t/0": [0, 1]}, {"t/0": 2**64 - 1}), ({"t/0": [0, 2**63]}, {})):
        reply = ask(checkpointing.address, {"op": "push", "tables": [], "ranges": ranges, "epochs": epochs})
        assert not reply["ok"] and "2**63" in reply["error"]["message"], reply
    with ParamClient([checkpointing.address]) as client:
        client.claim(["t/0"])
        client.push({}, ranges={"t/0": (0, 1)})
    assert "Traceback" not in checkpointing.stop()


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_an_update_whose_sum_or_square_overflows_is_refused(client: ParamClient, optimizer: str) -> None:
    client.create_table("t", 2, optimizer=optimizer, lr=1.0)
    client.push({"t": (["a", "b"], np.ones((2, 2), np.float32))})
    before = client.pull("t", ["a", "b"]).values
    for ids, value in ((["a", "a"], 3e38), (["a"], 2e19), (["b"] * 1001, 1e12)):
        with pytest.raises(ParamServerError, match="exceeds 1e\\+15"):
            client.push({"t": (ids, np.full((len(ids), 2), value, np.float32))})
    after = client.pull("t", ["a", "b"]).values
    assert np.isfinite(after).all() and np.array_equal(before, after)
    client.push({"t": (["a"] * 1000, np.full((1000, 2), 1e11, np.float32))})  # 1e14 summed: large, allowed
    client.push({"t": (["a"], np.full((1, 2), -1e14, np.float32))})
    assert np.isfinite(client.pull("t", ["a"]).values).all()


def test_an_item_counted_again_in_one_push_is_capped_on_its_sum(client: ParamClient) -> None:
    with pytest.raises(ParamServerError, match="add up to at most"):
        client.push({}, item_counts=(["item"] * 1000, np.full(1000, 10**9)))
    assert client.item_event_counts() == [{}]


def test_a_dropped_table_stays_dropped_after_a_restart(start_server: StartServer, tmp_path: Path) -> None:
    """The drop changed no version, so a checkpoint taken before it was the last word."""
    args = ("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0.2")
    first = start_server(*args)
    with ParamClient([first.address]) as client:
        client.create_table("kept", 2)
        client.create_table("dropped", 2)
        client.push({"dropped": (["a"], np.ones((1, 2), np.float32))})
        time.sleep(1.0)  # checkpointed with both tables
        assert client.drop_table("dropped")
    first.stop()
    with ParamClient([start_server(*args).address]) as client:
        assert sorted(client.tables()) == ["kept"]


def test_a_header_that_is_no_request_is_answered_before_the_connection_closes(client: ParamClient,
                                                                               server: ServerProcess) -> None:
    for head in (b"[1, 2]", b"not json", b""):
        assert ask_raw(server.address, head)["error"]["type"] == "MalformedFrame", head
    twice = [["x", "<f4", [1], 0], ["x", "<f4", [1], 0]]
    reply = ask_raw(server.address, orjson.dumps({"op": "info", "arrays": twice}), b"\0" * 4)
    assert reply["error"]["type"] == "MalformedFrame" and "described twice" in reply["error"]["message"]
    assert client.tables() == {}  # the server goes on
