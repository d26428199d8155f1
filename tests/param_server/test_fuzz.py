"""Hostile peers against a real server process: the attack from issue 12, SIGTERM under it, and a
fuzz of random, structured and mutated frames while a well-behaved client keeps working."""

from __future__ import annotations

import signal
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrec.core.net import free_port
from streamrec.param_server import protocol
from streamrec.param_server.client import ParamClient, ParamServerError
from streamrec.param_server.limits import ConnectionGate, ServerLimits
from tests.param_server.conftest import ServerProcess, StartServer

TOKEN = "s3cret-token"
GOOD_TABLE = "GOOD"  # fuzzed table names are lower case, so the fuzz never touches the good client's table
FUZZ_BUDGET = 64 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def frame(header: dict, body: bytes = b"", magic: bytes = protocol.MAGIC) -> bytes:
    head = orjson.dumps(header)
    return protocol.PREFIX.pack(magic, len(head), len(body)) + head + body


def hello(token: str | None = TOKEN) -> bytes:
    return frame({"op": "hello", "token": token, "arrays": []})


def exchange(address: str, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send `payload`, half-close, and read until the server closes: the server is done with it."""
    host, _, port = address.rpartition(":")
    received = bytearray()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
    except OSError:  # the server refused or reset a hostile connection: expected
        pass
    return bytes(received)


class GoodClient(threading.Thread):
    """Pulls and pushes in a loop with a short timeout and no retries, recording any error and the
    server's peak RSS."""

    def __init__(self, server: ServerProcess):
        super().__init__(daemon=True)
        self.server, self.stop, self.errors, self.calls, self.peak_rss = server, threading.Event(), [], 0, 0

    def run(self) -> None:
        ids = np.arange(256)
        try:
            with ParamClient([self.server.address], token=TOKEN, timeout=10.0, retries=0) as client:
                while not self.stop.is_set():
                    client.push({GOOD_TABLE: (ids, np.full((256, 8), 0.01, np.float32))}, events=256)
                    rows = client.pull(GOOD_TABLE, ids)
                    assert rows.found.all() and np.isfinite(rows.values).all()
                    self.calls += 1
                    self.peak_rss = max(self.peak_rss, rss_bytes(self.server.proc.pid))
        except (OSError, ParamServerError, AssertionError) as exc:  # recorded for the test thread to assert on
            self.errors.append(exc)


@pytest.fixture
def good_server(start_server: StartServer) -> Iterator[ServerProcess]:
    server = start_server("--no-checkpoints", "--byte-budget", str(FUZZ_BUDGET), "--max-body-bytes", str(32 << 20),
                          "--max-unauthenticated", "64", "--auth-timeout", "2", token=TOKEN)
    with ParamClient([server.address], token=TOKEN) as client:
        client.create_table(GOOD_TABLE, 8, key_type="int", optimizer="sgd", lr=0.1)
        client.create_table("fz", 4, key_type="int")
        client.create_table("fs", 4)
    yield server


def test_attack_from_issue_is_refused_before_allocating(good_server: ServerProcess) -> None:
    """Three connections announce a 3 GiB body after a 10-byte header, without the token, in the
    current and the old protocol version: the server never allocates it and keeps answering."""
    pid = good_server.proc.pid
    host, _, port = good_server.address.rpartition(":")
    attackers = []
    for magic in (protocol.MAGIC, b"SRP1"):
        for _ in range(3):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(protocol.PREFIX.pack(magic, 10, 3 << 30) + b'{"op":"x"}')
            try:
                sock.sendall(b"\0" * (1 << 20))  # the start of the body, if the server is still listening
            except OSError:
                pass
            attackers.append(sock)
    with ParamClient([good_server.address], token=TOKEN, timeout=2.0, retries=0) as client:
        for _ in range(20):
            client.push({GOOD_TABLE: (np.arange(10), np.ones((10, 8), np.float32))})
            assert client.pull(GOOD_TABLE, np.arange(10)).found.all()
    assert rss_bytes(pid) < 300e6
    for sock in attackers:
        sock.settimeout(5)
        try:
            reply = sock.recv(4096)  # the refusal, then the connection is closed
        except ConnectionResetError:  # the refusal was discarded with the unread body
            reply = b""
        assert not reply or b"FrameRefused" in reply
        sock.close()


def test_unauthenticated_connections_cannot_lock_out_a_client(good_server: ServerProcess) -> None:
    """Idle connections that never say hello fill only the unauthenticated slots, and are dropped
    after the auth deadline."""
    host, _, port = good_server.address.rpartition(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(80)]
    with ParamClient([good_server.address], token=TOKEN, timeout=2.0, retries=0) as client:
        assert client.pull(GOOD_TABLE, np.arange(3)).values.shape == (3, 8)
    idle[0].settimeout(10)
    assert idle[0].recv(1) == b""  # closed by the server at the auth deadline
    for sock in idle:
        sock.close()


def test_a_full_set_of_unauthenticated_slots_makes_room_by_closing_the_oldest() -> None:
    """The gate itself: with its unauthenticated slots full, a newcomer is admitted and the
    connection that has waited longest is shut down (its peer reads end-of-stream); authenticated
    connections are never the ones pushed out."""
    gate = ConnectionGate(ServerLimits(max_unauthenticated=2))
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        server_ends, peers = [a for a, _ in pairs], [b for _, b in pairs]
        assert gate.admit(server_ends[0]) and gate.promote(server_ends[0])  # said hello
        assert gate.admit(server_ends[1]) and gate.admit(server_ends[2])
        assert gate.counts() == (1, 2)
        assert gate.admit(server_ends[3])
        assert gate.counts() == (1, 2)
        peers[1].settimeout(2)
        assert peers[1].recv(1) == b""  # the oldest waiting one was closed for the newcomer
        for survivor in (peers[0], peers[2], peers[3]):
            survivor.setblocking(False)
            with pytest.raises(BlockingIOError):  # still open: nothing to read, no end-of-stream
                survivor.recv(1)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_bad_values_get_error_replies(good_server: ServerProcess) -> None:
    with ParamClient([good_server.address], token=TOKEN) as client:
        ids = np.arange(4)
        grads = np.ones((4, 8), np.float32)
        for kwargs, match in [({"events": -1}, "events"), ({"events": 10**12}, "events"),
                              ({"event_time": 1e12}, "future"), ({"event_time": -1.0}, "negative")]:
            with pytest.raises(Exception, match=match):
                client.push({GOOD_TABLE: (ids, grads)}, **kwargs)
        with pytest.raises(Exception, match="finite"):
            client.push({GOOD_TABLE: (ids, np.full((4, 8), np.inf, np.float32))})
        with pytest.raises(Exception, match="1024"):
            client.pull("fs", ["x" * 1025])
        with pytest.raises(Exception, match="item counts"):
            client.push({}, item_counts=(["a"], np.array([-5])))
        assert not client.pull(GOOD_TABLE, ids).found.any()  # nothing was applied; the connection still works


def _stall_after_announcing(address: str, body: int, trickle: bool) -> socket.socket:
    """An authenticated peer that announces a `body`-byte frame and then sends nothing (or a
    byte a second, each of which used to reset the idle timeout)."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(hello() + protocol.PREFIX.pack(protocol.MAGIC, 10, body) + b'{"op":"x"}')
    sock.recv(4096)  # the hello's reply
    if trickle:
        def drip() -> None:
            try:
                for _ in range(30):
                    sock.sendall(b"\0")
                    threading.Event().wait(1.0)
            except OSError:  # cut by the server: what the test wants
                pass
        threading.Thread(target=drip, daemon=True).start()
    return sock


@pytest.mark.parametrize("trickle", [False, True], ids=["silent", "trickling"])
def test_stalled_peers_give_their_share_of_the_budget_back(good_server: ServerProcess, trickle: bool) -> None:
    """Two peers announce frames that together hold the whole byte budget, then stall. They are
    cut within the frame grace (3 s), before the good client's frame gives up waiting for room
    (5 s). Before the frame pace they held it until the idle timeout (600 s), and every other
    client's push and pull was refused as `server busy`."""
    body = FUZZ_BUDGET // 2 - 64
    stalled = [_stall_after_announcing(good_server.address, body, trickle) for _ in range(2)]
    threading.Event().wait(0.5)  # both frames are reserved now
    with ParamClient([good_server.address], token=TOKEN, timeout=20.0, retries=0) as client:
        client.push({GOOD_TABLE: (np.arange(4), np.ones((4, 8), np.float32))})
        assert client.pull(GOOD_TABLE, np.arange(4)).found.all()
    for sock in stalled:
        sock.settimeout(5)
        try:
            while sock.recv(65536):  # up to the server's end-of-stream (or reset)
                pass
        except ConnectionResetError:
            pass
        sock.close()


def test_a_reply_is_cut_to_the_body_cap_whatever_chunk_rows_asks(start_server: StartServer) -> None:
    """A delta is sent in chunks held whole until the peer reads them; `chunk_rows` asked for
    2^40 rows (one chunk of the whole table per connection, each pinned by a peer that never
    read it) now gets chunks within --max-body-bytes."""
    cap = 1 << 20
    server = start_server("--no-checkpoints", "--max-body-bytes", str(cap))
    with ParamClient([server.address]) as client:
        client.create_table("wide", 64, key_type="int")
        ids = np.arange(20_000)
        for start in range(0, ids.size, 2_000):
            client.assign("wide", ids[start : start + 2_000], np.ones((2_000, 64), np.float32))
        chunks = list(client.delta_chunks("wide", 0, chunk_rows=1 << 40))
    assert len(chunks) > 1 and sum(len(chunk.ids) for chunk in chunks) == ids.size
    assert max(chunk.values.nbytes for chunk in chunks) <= cap


ODD_VALUES = (1, "x", "4", [1], {"a": 1}, None, 1.5, True, -1, 2**63, 1e308, [[1]], ["a", {"x": 1}])
HEADER_FIELDS = {"create_table": ("spec",), "drop_table": ("table",), "pull": ("table", "learned"),
                 "push": ("tables", "meta", "ranges", "epochs", "event_time", "events", "incarnation"),
                 "assign": ("table", "event_time", "only_new"), "delta": ("table", "since", "chunk_rows"),
                 "put_blob": ("name",), "get_blob": ("name", "since"), "claim": ("pkeys",)}
SPEC_FIELDS = ("dim", "scalars", "key_type", "optimizer", "init_std", "seed", "min_count", "ttl", "max_rows",
               "admission_width")
ODD_OPTIMIZERS = ({"name": "adagrad", "lr": 1e308}, {"eps": -1.0}, {"eps": 0.0}, {"initial_accumulator": "q"},
                  {"name": "sgd", "lr": "x"}, {"scalar_lr": -1})


def test_header_fields_of_the_wrong_type_are_refused_and_never_stored(start_server: StartServer) -> None:
    """Every field a frame header carries, given every JSON type: an error reply of the caller's
    kind (no server traceback in the log), and nothing stored that breaks later. A blob named 7
    made every blob listing unserialisable (serving's sync failed for good, the checkpoint kept
    it); a table spec with seed [1], an lr of 1e308 or a negative Adagrad eps was created, and
    its rows came out non-finite or its pushes divided by zero."""
    server = start_server("--no-checkpoints")
    host, _, port = server.address.rpartition(":")
    frames = [{"op": op, "table": "t", "tables": [], field: value}
              for op, fields in HEADER_FIELDS.items() for field in fields for value in ODD_VALUES]
    frames += [{"op": "create_table", "spec": {"name": f"s{i}", "dim": 4, field: value}}
               for i, (field, value) in enumerate((f, v) for f in SPEC_FIELDS for v in (*ODD_VALUES, *ODD_OPTIMIZERS))]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(frame({"op": "hello", "arrays": []}))
        protocol.recv(sock)
        sock.sendall(frame({"op": "create_table", "spec": {"name": "t", "dim": 4}, "arrays": []}))
        assert protocol.recv(sock).header["ok"]
        for header in frames:
            sock.sendall(frame({**header, "arrays": []}))
            reply = protocol.recv(sock)
            assert reply is not None, header
            assert reply.header["ok"] or reply.header["error"]["type"] in {"ValueError", "TypeError", "KeyError",
                                                                          "offsets"}, (header, reply.header)
    with ParamClient([server.address], retries=0) as client:
        assert set(client.blobs()) <= {"x", "4"}  # only names that are strings were stored
        for table in client.info()[0]["tables"]:  # every table that was created works
            name, width = table["name"], table["spec"]["dim"] + table["spec"]["scalars"]
            client.push({name: (["a"], np.ones((1, width), np.float32))})  # one row: max_rows 1 is valid
            assert np.isfinite(client.pull(name, ["a"]).values).all(), table
    assert "Traceback" not in server.stop()


def test_ops_a_peer_makes_up_get_error_replies_under_one_metrics_label(start_server: StartServer) -> None:
    """An op that is not a string (a list was unhashable: a traceback, no reply, the connection
    gone) gets an error reply like an unknown name, and made-up names share the metrics label
    `unknown` (a label each grew the server's memory for good)."""
    metrics_port = free_port()
    server = start_server("--no-checkpoints", "--metrics-port", str(metrics_port))
    host, _, port = server.address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(frame({"op": "hello", "arrays": []}))
        protocol.recv(sock)
        for op in ([1], {"a": 1}, 7, "made-up-1", "made-up-2"):
            sock.sendall(frame({"op": op, "arrays": []}))
            reply = protocol.recv(sock)
            assert reply is not None and reply.header["ok"] is False
            assert reply.header["error"]["type"] == "ValueError" and "unknown operation" in reply.header["error"]["message"]
    exposed = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'op="unknown"' in exposed and "made-up" not in exposed


def test_the_servers_own_io_error_is_an_error_reply_not_a_dropped_connection(start_server: StartServer,
                                                                            tmp_path: Path) -> None:
    """A checkpoint the server cannot write (its shard directory is a file: a full disk fails the
    same way) answers the caller with the OSError, and the connection stays usable. It used to
    be taken for a socket error: the connection was dropped without a word."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "shard-0-of-1").write_text("not a directory")
    server = start_server("--checkpoint-dir", str(checkpoints), "--checkpoint-every", "0")
    with ParamClient([server.address], retries=0) as client:
        client.create_table("t", 4, key_type="int")
        with pytest.raises(ParamServerError) as failed:
            client.checkpoint()
        assert failed.value.kind in {"NotADirectoryError", "FileExistsError"}
        client.assign("t", np.arange(3), np.ones((3, 4), np.float32))  # the same connection goes on
        assert client.pull("t", np.arange(3)).found.all()


def test_string_ids_that_are_not_utf8_are_refused(good_server: ServerProcess) -> None:
    """Such an id was stored, and every delta of the table failed to decode from then on (a
    serving worker could never sync it again). An id split inside a character is refused too,
    though the buffer of all ids decodes."""
    with ParamClient([good_server.address], token=TOKEN, retries=0) as client:
        for ids in ([b"\xff\xfe"], [b"ok", b"\xc3", b"\xa9"]):
            with pytest.raises(ParamServerError, match="UTF-8"):
                client.assign("fs", ids, np.ones((len(ids), 4), np.float32))
        client.assign("fs", ["caf\u00e9", "\U0001f600", "a:b"], np.ones((3, 4), np.float32))
        synced = [key for chunk in client.delta_chunks("fs", 0) for key in chunk.ids.to_list()]
    assert sorted(synced) == sorted(["caf\u00e9", "\U0001f600", "a:b"])


def test_sigterm_stops_the_server_under_attack(good_server: ServerProcess) -> None:
    host, _, port = good_server.address.rpartition(":")
    stuck = []
    for _ in range(3):  # unauthenticated, mid-prefix
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"SRP2\x0a")
        stuck.append(sock)
    for _ in range(3):  # authenticated, mid-body of a large frame
        sock = socket.create_connection((host, int(port)))
        sock.sendall(hello() + protocol.PREFIX.pack(protocol.MAGIC, 10, 30 << 20) + b'{"op":"x"}' + b"\0" * (1 << 20))
        stuck.append(sock)
    good_server.proc.send_signal(signal.SIGTERM)
    good_server.proc.wait(timeout=5)
    assert good_server.proc.returncode == 0
    for sock in stuck:
        sock.close()


# ---- fuzz -----------------------------------------------------------------------------------

def _valid_frames() -> list[bytes]:
    ids = np.arange(16, dtype=np.int64)
    grads = np.ones((16, 4), np.float32)
    layout = [["ids0", "<i8", [16], 0], ["grads0", "<f4", [16, 4], 128]]
    body = ids.tobytes() + grads.tobytes()
    names = b"abcdef"
    offsets = np.array([0, 2, 4, 6], np.int64)
    return [
        frame({"op": "pull", "table": "fz", "arrays": [["ids", "<i8", [16], 0]]}, ids.tobytes()),
        frame({"op": "push", "tables": ["fz"], "client_id": 7, "seq": 1, "events": 3, "arrays": layout}, body),
        frame({"op": "pull", "table": "fs", "arrays": [["ids.blob", "|u1", [6], 0], ["ids.offsets", "<i8", [4], 8]]},
              names + b"\0\0" + offsets.tobytes()),
        frame({"op": "put_blob", "name": "fzblob", "arrays": [["data", "|u1", [5], 0]]}, b"hello"),
        frame({"op": "delta", "table": "fz", "since": 0, "chunk_rows": 4, "arrays": []}),
        frame({"op": "create_table", "spec": {"name": "fznew", "dim": 4, "key_type": "int"}, "arrays": []}),
        frame({"op": "claim", "pkeys": ["fz/0"], "arrays": []}),
    ]


VALID = _valid_frames()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(alphabet="abcfz/._-", max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet="abcz_", max_size=6), inner, max_size=4),
    max_leaves=12,
)
ops = st.sampled_from(["pull", "push", "assign", "delta", "put_blob", "get_blob", "create_table", "drop_table", "claim",
                       "meta", "info", "watermarks", "item_counts", "checkpoint", "hello", "nope"])


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """A frame with a plausible header (fuzz tables only) and random arrays over a random body."""
    header = draw(st.dictionaries(st.sampled_from(["table", "tables", "since", "chunk_rows", "events", "event_time", "meta",
                                                   "client_id", "seq", "ranges", "epochs", "name", "spec", "pkeys"]),
                                  json_values, max_size=6))
    header["op"] = draw(ops)
    if "table" in header or draw(st.booleans()):
        header["table"] = draw(st.sampled_from(["fz", "fs", "fznew", "nope"]))
    body = draw(st.binary(max_size=512))
    header["arrays"] = draw(st.lists(st.tuples(
        st.sampled_from(["ids", "ids.blob", "ids.offsets", "ids0", "grads0", "values", "data", "counted", "counts"]),
        st.sampled_from(sorted(protocol.ALLOWED_DTYPES) + ["<c16", "O"]),
        st.lists(st.integers(-2, 64), max_size=3), st.integers(-8, 600)).map(list), max_size=4))
    return frame(header, body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[position : position + draw(st.integers(1, 16))]
            if not data:
                data = bytearray(b"\0")
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


hostile = st.one_of(
    st.binary(max_size=256).map(lambda raw: ("raw", raw)),
    structured().map(lambda f: ("auth", f)),
    mutated().map(lambda f: ("auth", f)),
    structured().map(lambda f: ("anon", f)),
)


@pytest.mark.parametrize("examples", [pytest.param(40, id="2k-frames"), pytest.param(200, id="10k-frames", marks=pytest.mark.slow)])
def test_fuzz_frames_while_a_good_client_works(good_server: ServerProcess, examples: int) -> None:
    """examples x 50 hostile frames, over connections from 4 threads, while GoodClient pulls and
    pushes: the server stays up, the good client sees no error, RSS stays within baseline + budget."""
    good = GoodClient(good_server)
    good.start()
    baseline = rss_bytes(good_server.proc.pid)
    sent = []

    def send_batch(batch: list[tuple[str, bytes]]) -> None:
        for kind, payload in batch:
            prefix = hello() if kind == "auth" else b""
            exchange(good_server.address, prefix + payload)
            sent.append(kind)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile, min_size=50, max_size=50))
    def run_batch(batch: list[tuple[str, bytes]]) -> None:
        workers = [threading.Thread(target=send_batch, args=(batch[i::4],)) for i in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert good_server.proc.poll() is None, "the server died"

    try:
        run_batch()
    finally:
        good.stop.set()
        good.join(timeout=30)
    assert len(sent) == examples * 50
    assert not good.errors, good.errors
    assert good.calls > 0
    assert good.peak_rss < baseline + FUZZ_BUDGET, (baseline, good.peak_rss)
    with ParamClient([good_server.address], token=TOKEN) as client:
        assert client.pull(GOOD_TABLE, np.arange(256)).found.all()
