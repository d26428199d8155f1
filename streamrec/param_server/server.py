"""The parameter-server process: a threaded TCP server in front of one shard's ParamStore.

One thread per connection (a client keeps its connection open), each reading a frame, running the
operation under the store's lock and writing the reply. Numpy releases the GIL for large copies
and the socket I/O releases it too, so concurrent clients overlap well enough for one shard; more
throughput comes from more shards. A connection authenticates once, with its first frame (a small
hello carrying the shared token when one is configured), before the server reads anything large;
`ServerLimits` caps frames, connections and the bytes in flight (see docs/param_server.md, "Limits").
Every reply (errors included) carries the store's incarnation and whether it started empty, so a
client notices a restart on whatever call it makes next.
"""

from __future__ import annotations

import hmac
import logging
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.param_server import protocol
from streamrec.param_server.checkpoint import (
    RESHARD_STAGING,
    CheckpointDir,
    CheckpointResult,
    LoadedCheckpoint,
    UnfinishedReshard,
)
from streamrec.param_server.defaults import DEFAULT_KEEP_CHECKPOINTS, DEFAULT_MAX_ROWS
from streamrec.param_server.ledger import PushRefused
from streamrec.param_server.limits import ConnectionGate, ServerLimits
from streamrec.param_server.metrics import ServerMetrics
from streamrec.param_server.protocol import Message, keys_arrays, keys_from
from streamrec.param_server.signing import CHECKPOINT_CONTEXT, derived_key
from streamrec.param_server.store import ParamStore
from streamrec.param_server.table import TableFullError

DEFAULT_CHUNK_ROWS = 65536
MAX_NAME_CHARS = 1024  # a table's or blob's name on the wire
log = logging.getLogger(__name__)
Reply = tuple[dict[str, Any], dict[str, np.ndarray]]
# errors a caller caused: reported to it by type name, not logged as server faults
CLIENT_ERRORS = (KeyError, ValueError, TypeError, TableFullError)


def named(header: dict[str, Any], field: str = "table") -> str:
    """A table's or blob's name from a frame header. A name of another JSON type was taken as it
    came: a blob named 7 made every later blob listing unserialisable, so every serving worker's
    sync failed from then on (and the checkpoint carried it over a restart)."""
    return checked_name(header.get(field), field)


def checked_name(value: object, field: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise TypeError(f"{field} must be a string of 1 to {MAX_NAME_CHARS} characters, got {str(value)[:100]!r}")
    return value


def _listed(header: dict[str, Any], field: str) -> list[object]:
    value = header.get(field)
    if not isinstance(value, list):  # list("ab") would claim partitions "a" and "b"
        raise TypeError(f"{field} must be a list, got {str(value)[:100]!r}")
    return value


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        self.server.param_server.serve_connection(self.request, self.client_address)


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    # socketserver listens with a backlog of 5: when every trainer and serving worker reconnects at
    # once (a restarted shard) the kernel drops the extra SYNs and those clients wait 1-3 s to retry
    request_queue_size = socket.SOMAXCONN
    param_server: ParamServer

    def verify_request(self, request: socket.socket, client_address: object) -> bool:  # type: ignore[override]
        """Admit a connection before starting its thread (`ConnectionGate.admit`: beyond the
        unauthenticated limit the oldest connection still to say hello makes room)."""
        return self.param_server.gate.admit(request)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        self.param_server.gate.leave(request)
        super().shutdown_request(request)


class ParamServer:
    def __init__(
        self,
        store: ParamStore,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        checkpoints: CheckpointDir | None = None,
        metrics: ServerMetrics | None = None,
        limits: ServerLimits | None = None,
    ):
        self.store = store
        self.token = token.encode() if token else None
        self.checkpoints = checkpoints
        self.metrics = metrics or ServerMetrics(store)
        self.limits = limits or ServerLimits()
        self.gate = ConnectionGate(self.limits)
        self.budget = protocol.ByteBudget(self.limits.byte_budget, self.limits.budget_wait)
        self._checkpoint_lock = threading.Lock()
        self._checkpointed_version = store.version
        self._tcp = _TCPServer((host, port), _Handler)
        self._tcp.param_server = self
        self._thread: threading.Thread | None = None
        self._ops: dict[str, Callable[[Message], Iterable[Reply]]] = {
            "hello": self._hello,
            "info": self._info,
            "create_table": self._create_table,
            "drop_table": self._drop_table,
            "pull": self._pull,
            "push": self._push,
            "assign": self._assign,
            "delta": self._delta,
            "put_blob": self._put_blob,
            "get_blob": self._get_blob,
            "meta": self._meta,
            "claim": self._claim,
            "watermarks": self._watermarks,
            "item_counts": self._item_counts,
            "checkpoint": self._checkpoint,
        }

    @property
    def address(self) -> tuple[str, int]:
        return self._tcp.server_address[:2]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._tcp.serve_forever, name="param-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, then shut every open connection down: threads blocked reading return at
        once, whatever their peers are doing."""
        self._tcp.shutdown()
        self._tcp.server_close()
        self.gate.close_all()

    # ---- connections --------------------------------------------------------------------------

    def serve_connection(self, sock: socket.socket, peer: object) -> None:
        """Authenticate (a small hello frame within `auth_timeout`), then answer frames in order
        until the peer leaves, idles past `idle_timeout`, or breaks the protocol."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if not self._authenticate(sock):
                return
            sock.settimeout(self.limits.idle_timeout)
            while True:
                message = self._read(sock)
                if message is None:
                    return
                try:
                    self.answer(sock, message)
                finally:
                    self.budget.release(message.reserved)
        except (protocol.FrameRefused, protocol.MalformedFrame) as exc:  # said, not just a closed connection
            kind = type(exc).__name__
            self.metrics.errors.labels(op="frame", type=kind).inc()
            self._tell(sock, kind, str(exc))
        except OSError as exc:  # ProtocolError, ConnectionError, timeouts: drop this connection only
            log.debug("connection from %s dropped: %s", peer, exc)

    def _authenticate(self, sock: socket.socket) -> bool:
        deadline = time.monotonic() + self.limits.auth_timeout
        sizes = protocol.read_prefix(sock, protocol.HELLO_LIMITS, deadline)
        if sizes is None:
            return False
        hello = protocol.read_frame(sock, *sizes, deadline)
        if hello.header.get("op") != "hello":
            self._tell(sock, "Unauthorized", "the first frame of a connection must be hello")
        elif not self.authorised(hello.header):
            self._tell(sock, "Unauthorized", "bad or missing token")
        elif not self.gate.promote(sock):
            self._tell(sock, "Busy", f"too many connections (limit {self.limits.max_connections})")
        else:
            self.answer(sock, hello)
            return True
        return False

    def _read(self, sock: socket.socket) -> Message | None:
        """The next frame of an authenticated peer, its bytes reserved in the budget first, then
        read at the limits' pace (a stalled peer gives its reservation back within seconds)."""
        sizes = protocol.read_prefix(sock, self.limits.frames)
        if sizes is None:
            return None
        reserved = sum(sizes)
        self.budget.acquire(reserved)
        try:
            message = protocol.read_frame(sock, *sizes, pace=self.limits.pace)
        except BaseException:
            self.budget.release(reserved)
            raise
        finally:
            sock.settimeout(self.limits.idle_timeout)  # between frames: the idle timeout again
        message.reserved = reserved
        return message

    def _tell(self, sock: socket.socket, kind: str, message: str) -> None:
        """A last error reply before the connection is dropped (best effort: the peer may be gone)."""
        try:
            self.reply(sock, {"ok": False, "error": {"type": kind, "message": message}})
        except OSError:
            pass

    def reply(self, sock: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        """Send one reply at the limits' pace: a peer that stops reading is cut within seconds
        instead of pinning the reply's memory for the idle timeout."""
        try:
            protocol.send(sock, {**header, **self.store.identity()}, arrays, pace=self.limits.pace)
        finally:
            sock.settimeout(self.limits.idle_timeout)

    def authorised(self, header: dict[str, Any]) -> bool:
        if self.token is None:
            return True
        offered = header.get("token")
        return isinstance(offered, str) and hmac.compare_digest(offered.encode(), self.token)

    # ---- checkpoints --------------------------------------------------------------------------

    def checkpoint(self, force: bool = False) -> CheckpointResult | None:
        """Write a checkpoint if anything changed since the last one (or if forced)."""
        if self.checkpoints is None:
            raise ValueError("this server has no checkpoint directory (--checkpoint-dir)")
        with self._checkpoint_lock:
            if not force and self.store.version == self._checkpointed_version:
                return None
            try:
                result = self.checkpoints.save(self.store)
            except OSError:
                self.metrics.checkpoint_failures.inc()
                raise
            self._checkpointed_version = result.version
            self.metrics.checkpoint_seconds.observe(result.seconds)
            self.metrics.last_checkpoint_time = time.time()
            log.info("checkpoint %s (%d bytes, %.2fs)", result.path, result.bytes, result.seconds)
            return result

    # ---- requests -----------------------------------------------------------------------------

    def answer(self, sock: socket.socket, message: Message) -> None:
        """Send the replies of the frame's operation; an OSError from sending them (the peer is
        gone) drops the connection, every other failure is an error reply (`_replies`)."""
        op = message.header.get("op")
        label = op if isinstance(op, str) and op in self._ops else "unknown"
        started = time.perf_counter()
        for header, arrays in self._replies(label, op, message):
            self.reply(sock, header, arrays)
        self.metrics.request_seconds.labels(op=label).observe(time.perf_counter() - started)

    def _replies(self, label: str, op: object, message: Message) -> Iterator[Reply]:
        """The operation's replies, or after them an error reply: for the caller's errors, a
        server bug, and the server's own I/O (a full disk, memory the kernel refused), which used
        to be taken for the socket's and dropped the connection without a word. Metrics label
        known operations by name and any other `unknown`: a label per name a peer made up grew
        the server's memory for good."""
        try:
            if label == "unknown":
                raise ValueError(f"unknown operation {str(op)[:100]!r}")
            for header, arrays in self._ops[label](message):
                yield {"ok": True, **header}, arrays
        except CLIENT_ERRORS as exc:
            yield self._error(label, exc)
        except OSError as exc:
            log.error("request %s failed on the server's own I/O: %s", label, exc)
            yield self._error(label, exc)
        except Exception as exc:  # a server bug: log it with its traceback, tell the caller, stay up
            log.exception("request %s failed", label)
            yield self._error(label, exc)

    def _error(self, op: str, exc: Exception) -> Reply:
        kind = exc.kind if isinstance(exc, PushRefused) else type(exc).__name__
        self.metrics.errors.labels(op=op, type=kind).inc()
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        error: dict[str, Any] = {"type": kind, "message": str(message)}
        if isinstance(exc, PushRefused):
            error["next_offsets"] = exc.next_offsets
        return {"ok": False, "error": error}, {}

    def _rows(self, op: str, n: int) -> None:
        self.metrics.request_rows.labels(op=op).observe(n)

    def _hello(self, message: Message) -> Iterable[Reply]:
        info = self.store.info()
        return [({key: info[key] for key in ("shard", "num_shards", "version", "start_version")}, {})]

    def _info(self, message: Message) -> Iterable[Reply]:
        return [({"info": self.store.info()}, {})]

    def _create_table(self, message: Message) -> Iterable[Reply]:
        return [({"table": self.store.create_table(self.store.spec_from(message.header.get("spec")))}, {})]

    def _drop_table(self, message: Message) -> Iterable[Reply]:
        return [({"dropped": self.store.drop_table(named(message.header))}, {})]

    def _pull(self, message: Message) -> Iterable[Reply]:
        keys = keys_from(message.arrays)
        self._rows("pull", len(keys))
        if message.header.get("learned") is True:  # the watermarks the rows have learned, too
            values, found, dim, learned = self.store.pull_learned(named(message.header), keys,
                                                                  self.limits.frames.max_body)
            return [({"dim": dim, "learned": learned}, {"values": values, "found": found})]
        values, found, dim = self.store.pull(named(message.header), keys, self.limits.frames.max_body)
        return [({"dim": dim}, {"values": values, "found": found})]

    def _push(self, message: Message) -> Iterable[Reply]:
        header, arrays = message.header, message.arrays
        updates = []
        for i, table in enumerate(_listed(header, "tables")):
            name = checked_name(table, "table")
            keys = keys_from(arrays, f"ids{i}")
            updates.append((name, keys, arrays[f"grads{i}"]))
            self._rows("push", len(keys))
        client = (int(header["client_id"]), int(header["seq"])) if "client_id" in header else None
        counted = (keys_from(arrays, "counted").to_list(), arrays["counts"]) if "counts" in arrays else None
        result = self.store.push(
            updates, header.get("meta"), header.get("events", 0), header.get("event_time"), client,
            ranges=header.get("ranges"), epochs=header.get("epochs"), item_counts=counted, incarnation=header.get("incarnation"),
        )
        return [({"version": result.version, "applied": result.applied}, {})]

    def _assign(self, message: Message) -> Iterable[Reply]:
        keys = keys_from(message.arrays)
        self._rows("assign", len(keys))
        version = self.store.assign(named(message.header), keys, message.arrays["values"], message.header.get("event_time"),
                                    only_new=bool(message.header.get("only_new", False)))
        return [({"version": version}, {})]

    def _delta(self, message: Message) -> Iterable[Reply]:
        """Stream the rows changed since `since` in chunks; deletions ride on the first chunk. A
        chunk is held whole until the peer has read it, so its size is capped like a pull's reply
        (`--max-body-bytes`), whatever `chunk_rows` asks: one chunk of a whole large table per
        connection that never read it pinned a copy of the table each."""
        table = named(message.header)
        # the plan and the first chunk under one lock: a one-chunk delta is the table as of its version;
        # a later chunk a change reached after the plan is `torn` (the reader follows it up)
        plan, chunk_rows, first = self.store.delta_start(
            table, int(message.header.get("since", 0)), max(1, int(message.header.get("chunk_rows", DEFAULT_CHUNK_ROWS))),
            self.limits.frames.max_body)
        self._rows("delta", plan.rows.size)
        starts = range(0, max(plan.rows.size, 1), chunk_rows)
        torn = False
        for i, start in enumerate(starts):
            keys, values, dim, chunk_torn = first if i == 0 else self.store.delta_chunk(
                table, plan.rows[start : start + chunk_rows], plan.version)
            torn = torn or chunk_torn
            header = {"version": plan.version, "reset": plan.reset, "dim": dim, "more": i < len(starts) - 1,
                      "torn": torn}
            arrays = {**keys_arrays(keys), "values": values}
            if i == 0:
                arrays.update(keys_arrays(plan.deleted, "deleted"))
            yield header, arrays

    def _put_blob(self, message: Message) -> Iterable[Reply]:
        data = message.arrays.get("data", np.empty(0, np.uint8)).tobytes()
        self._rows("put_blob", len(data))
        expect = message.header.get("expect")
        if expect is not None and (type(expect) is not int or expect < 0):
            raise TypeError(f"expect must be a version (an integer >= 0), got {str(expect)[:100]!r}")
        return [({"version": self.store.put_blob(named(message.header, "name"), data, expect)}, {})]

    def _get_blob(self, message: Message) -> Iterable[Reply]:
        if "name" not in message.header:
            return [({"blobs": self.store.blob_versions()}, {})]
        name = named(message.header, "name")
        blob = self.store.get_blob(name)
        if blob is None:
            raise KeyError(f"no blob named {name!r}")
        if blob.version <= int(message.header.get("since", 0)):
            return [({"version": blob.version, "changed": False}, {})]
        return [({"version": blob.version, "changed": True}, {"data": np.frombuffer(blob.data, np.uint8)})]

    def _meta(self, message: Message) -> Iterable[Reply]:
        return [({"meta": self.store.meta_record()}, {})]

    def _claim(self, message: Message) -> Iterable[Reply]:
        claimed = self.store.claim(_listed(message.header, "pkeys"))
        return [({"epochs": claimed.epochs, "next_offsets": claimed.next_offsets}, {})]

    def _watermarks(self, message: Message) -> Iterable[Reply]:
        return [({"next_offsets": self.store.watermarks()}, {})]

    def _item_counts(self, message: Message) -> Iterable[Reply]:
        return [({"counts": self.store.item_event_counts()}, {})]

    def _checkpoint(self, message: Message) -> Iterable[Reply]:
        result = self.checkpoint(force=True)
        return [({"path": str(result.path), "version": result.version, "seconds": result.seconds}, {})]


def open_store(
    shard: int, num_shards: int, checkpoint_dir: Path | None, keep: int = DEFAULT_KEEP_CHECKPOINTS, default_max_rows: int = DEFAULT_MAX_ROWS,
    token: str | None = None,
) -> tuple[ParamStore, CheckpointDir | None, LoadedCheckpoint | None]:
    """(store, its checkpoint directory, the checkpoint restored): the newest checkpoint that loads,
    falling back to older ones, or an empty store, which is logged loudly: a trainer must then learn
    the whole log again. With a token, checkpoints are signed and only signed ones load."""
    if checkpoint_dir is None:
        return ParamStore(shard, num_shards, default_max_rows=default_max_rows), None, None
    if (checkpoint_dir / RESHARD_STAGING).exists():
        raise UnfinishedReshard(f"{checkpoint_dir} is the target of a reshard that did not finish (it holds "
                                f"{RESHARD_STAGING}): run the same `streamrec param-server reshard` again, then start "
                                "the shards")
    key = derived_key(token, CHECKPOINT_CONTEXT) if token else None
    checkpoints = CheckpointDir(checkpoint_dir, shard, num_shards, keep, key)
    loaded = checkpoints.load_newest(default_max_rows)
    if loaded is not None:
        if checkpoints.rejected:
            log.error("restored the older checkpoint %s after %d newer one(s) failed to load", loaded.path, len(checkpoints.rejected))
        return loaded.store, checkpoints, loaded
    store = ParamStore(shard, num_shards, default_max_rows=default_max_rows)
    if checkpoints.rejected:
        log.error("STARTING EMPTY: none of the %d checkpoints in %s loads; every model state is gone", len(checkpoints.rejected), checkpoints.dir)
    else:
        log.warning("STARTING EMPTY: no checkpoint in %s", checkpoints.dir)
    return store, checkpoints, None


def run(
    *,
    host: str,
    port: int,
    shard: int,
    num_shards: int,
    token: str | None,
    checkpoint_dir: Path | None,
    checkpoint_every: float,
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS,
    max_rows: int = DEFAULT_MAX_ROWS,
    limits: ServerLimits | None = None,
    metrics_port: int,
    ready: Callable[[dict[str, Any]], None],
) -> None:
    """Serve until SIGTERM/SIGINT, checkpointing every `checkpoint_every` seconds and on the way out."""
    store, checkpoints, restored = open_store(shard, num_shards, checkpoint_dir, keep_checkpoints, max_rows, token)
    metrics = ServerMetrics(store)
    if restored is not None:
        metrics.last_checkpoint_time = restored.created_at
    if checkpoints is not None and checkpoints.rejected:
        metrics.checkpoints_rejected.inc(len(checkpoints.rejected))
    if metrics_port:
        metrics.serve(metrics_port, host)
    server = ParamServer(store, host, port, token, checkpoints, metrics, limits)
    server.start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    ready(
        {
            "address": "%s:%d" % server.address,
            "shard": shard,
            "num_shards": num_shards,
            "version": store.version,
            "incarnation": store.incarnation,
            "empty": store.empty,
            "restored": str(restored.path) if restored else None,
            "rejected_checkpoints": checkpoints.rejected if checkpoints else [],
        }
    )
    period = checkpoint_every if checkpoint_every > 0 and checkpoints is not None else 1.0
    while not stop.wait(period):
        if checkpoints is not None and checkpoint_every > 0:
            try:
                server.checkpoint()
            except OSError:
                log.exception("periodic checkpoint failed")
    server.stop()
    if checkpoints is not None:
        try:
            server.checkpoint()
        except OSError as exc:  # a full disk, most likely: say what survives, exit non-zero, no traceback
            newest = checkpoints.files()[:1]
            log.error("final checkpoint failed (%s): this shard stopped at version %d, the newest checkpoint on "
                      "disk is %s. A restart resumes from that, and the trainer re-applies the rest from Kafka's "
                      "retained log", exc, store.version, newest[0] if newest else "none")
            raise SystemExit(1) from None
