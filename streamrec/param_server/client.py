"""Client library: the server's calls over the network, routed to shards by a stable id hash.

    client = ParamClient(["127.0.0.1:7070", "127.0.0.1:7071"], token=...)
    client.create_table("users", 64, scalars=1, optimizer="adagrad", lr=0.007, scalar_lr=0.005)
    rows = client.pull("users", ["u1", "u2"])            # rows.vectors, rows.scalars, rows.found
    client.push({"users": (ids, grads)}, meta={...}, events=n)
    client.claim(["events/0"])                           # fence older owners of the partition
    client.push(updates, ranges={"events/0": (0, 512)}, item_counts=(item_ids, counts))
    client.take_restarts()                               # [ShardRestart(shard, old, new, empty)]
    d = client.delta("items", since=0); d = client.delta("items", since=d.version)

Routing: rendezvous hashing over the shards (`routing.shard_of`); it depends only on the id and the
shard count, so it is the same in every process and across restarts. A call that needs several shards sends all requests before reading any reply,
so shards work in parallel. Lost connections are re-opened and the call retried; a retried push is
recognised by the server (client id + sequence number) and not applied twice. Errors raised by the
server arrive as ParamServerError with the server's error type (OffsetsRefused and Fenced for ranged
pushes the exactly-once rule refuses). Every reply carries the shard's incarnation; a change is
recorded as a ShardRestart for `take_restarts`. Not thread-safe: one client per thread
(connections are cheap).
"""

from __future__ import annotations

import hmac
import secrets
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamrec.core.config import Settings
from streamrec.param_server import protocol
from streamrec.param_server.keys import IdsLike, Keys, as_keys
from streamrec.param_server.protocol import Message, keys_arrays, keys_from
from streamrec.param_server.routing import shard_of
from streamrec.param_server.signing import (
    BLOB_CONTEXT,
    MAC_BYTES,
    blob_mac,
    derived_key,
)
from streamrec.param_server.specs import OptimizerSpec, TableSpec

Request = tuple[dict[str, Any], dict[str, np.ndarray]]
NEWEST = 2**62  # a `since` no version reaches: a get_blob that answers the version only


@dataclass(frozen=True)
class PushOutcome:
    """Shards that applied a push, and shards that skipped it (it was applied there before)."""

    applied: list[int]
    skipped: list[int]


@dataclass(frozen=True)
class ShardRestart:
    """A shard answered with a new incarnation: its process restarted, from a checkpoint or, with
    `empty`, from nothing."""

    shard: int
    old: str
    new: str
    empty: bool


class ParamServerError(RuntimeError):
    """The server refused or failed a call; `kind` is the server-side error type. On a push,
    `outcome` tells what the shards that answered normally did (a push is atomic per shard only)."""

    def __init__(self, kind: str, message: str, shard: int):
        super().__init__(f"shard {shard}: {kind}: {message}")
        self.kind, self.shard = kind, shard
        self.reason = message
        self.outcome: PushOutcome | None = None


class OffsetsRefused(ParamServerError):
    """A ranged push left a gap, overlapped the shard's watermark, mixed applied and new partitions,
    or was cut before the shard restarted: nothing was applied on that shard. Resume each partition
    at `next_offsets` (missing: the shard has no watermark for it)."""

    def __init__(self, shard: int, reason: str, next_offsets: dict[str, int], outcome: PushOutcome | None = None):
        super().__init__("offsets", reason, shard)
        self.next_offsets, self.outcome = next_offsets, outcome


class Fenced(ParamServerError):
    """A newer claim owns some of the push's partitions (this trainer lost them in a rebalance)."""

    def __init__(self, shard: int, reason: str, next_offsets: dict[str, int], outcome: PushOutcome | None = None):
        super().__init__("fenced", reason, shard)
        self.next_offsets, self.outcome = next_offsets, outcome


def _server_error(shard: int, error: dict[str, Any]) -> ParamServerError:
    kind, message = error.get("type", "Error"), error.get("message", "")
    if kind == "offsets":
        return OffsetsRefused(shard, message, error.get("next_offsets", {}))
    if kind == "fenced":
        return Fenced(shard, message, error.get("next_offsets", {}))
    return ParamServerError(kind, message, shard)


def lowest_watermarks(per_shard: list[dict[str, int]]) -> dict[str, int]:
    """The watermarks every one of the shards has reached: per partition key, the lowest next
    offset; a key missing from any shard is left out (nothing of it is known to be learned)."""
    common = set(per_shard[0]).intersection(*per_shard[1:]) if per_shard else set()
    return {key: min(int(marks[key]) for marks in per_shard) for key in common}


@dataclass(frozen=True)
class Rows:
    """Pulled rows: `values` is (n, dim + scalars); `found` marks ids that have a real row (the
    others got the table's default, zeros)."""

    values: np.ndarray
    found: np.ndarray
    dim: int
    # `pull(..., learned=True)`: per partition key, the next offset every pulled row has learned
    # (the lowest over the shards that answered; a key some shard lacks is left out)
    learned: dict[str, int] | None = field(default=None, kw_only=True)

    @property
    def vectors(self) -> np.ndarray:
        return self.values[:, : self.dim]

    @property
    def scalars(self) -> np.ndarray:
        return self.values[:, self.dim :]


@dataclass(frozen=True)
class DeltaChunk:
    shard: int
    ids: Keys
    values: np.ndarray
    deleted: Keys  # only on a shard's first chunk
    version: int  # the shard's version when the delta was planned
    reset: bool  # the shard sent a full snapshot: drop everything held for this shard first
    dim: int
    torn: bool = False  # a change after `version` reached rows of this or an earlier chunk of the shard


@dataclass(frozen=True)
class Delta(Rows):
    """Changed rows of all shards (apply `deleted` first, then upsert ids/values). `full`: a complete
    snapshot, replace the local copy. Pass `version` back as `since` next time."""

    ids: Keys
    deleted: Keys
    version: tuple[int, ...]
    full: bool
    # some rows hold values newer than `version` (a multi-chunk delta a push reached while it was read):
    # applied, the copy is past `version` but not any version of the table; a delta since `version`
    # applied on top makes it the table as of that delta's version
    torn: bool = False


@dataclass(frozen=True)
class FetchedBlob:
    """A blob as `get_blob` returns it: the bytes and the version to pass back as `since`."""

    data: bytes
    version: int


class _Connection:
    def __init__(self, address: str, timeout: float):
        host, _, port = address.rpartition(":")
        self.address, self.host, self.port, self.timeout = address, host, int(port), timeout
        self.sock: socket.socket | None = None

    def open(self) -> bool:
        """Connect if needed; True when a new connection was made."""
        if self.sock is not None:
            return False
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        return True

    def send(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None) -> None:
        protocol.send(self.sock, header, arrays)

    def recv(self) -> Message:
        message = protocol.recv(self.sock)
        if message is None:
            raise ConnectionError(f"{self.address} closed the connection")
        return message

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class ParamClient:
    def __init__(
        self,
        addresses: Sequence[str] | str,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        retry_backoff: float = 0.2,
    ):
        addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not addresses:
            raise ValueError("need at least one parameter-server address")
        self.addresses = addresses
        self.token, self.retries, self.retry_backoff = token, retries, retry_backoff
        self._blob_key = derived_key(token, BLOB_CONTEXT) if token else None
        self._conns = [_Connection(address, timeout) for address in addresses]
        self._client_id = secrets.randbits(62)
        self._seq = 0
        self._incarnations: dict[int, str] = {}  # the newest seen per shard
        # per shard, the incarnation the caller knows about: the first one seen, then whatever
        # `take_restarts` last reported. Ranged pushes carry it, so a restart that some other call
        # noticed first still makes the next push be refused until the caller has dealt with it.
        self._acknowledged: dict[int, str] = {}
        self._restarts: list[ShardRestart] = []
        self._epochs: list[dict[str, int]] = [{} for _ in addresses]  # per shard: pkey -> claimed epoch

    @classmethod
    def from_settings(cls, settings: Settings) -> ParamClient:
        """From streamrec Settings: `param_servers` and `param_server_token`."""
        return cls(settings.param_servers, token=settings.param_server_token)

    @property
    def num_shards(self) -> int:
        return len(self._conns)

    def shard_of(self, ids: IdsLike) -> np.ndarray:
        return shard_of(ids, self.num_shards)

    def close(self) -> None:
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> ParamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ----------------------------------------------------------------------------

    def _check(self, shard: int, reply: Message) -> Message:
        """Note the shard's incarnation (a change is a restart), then raise its error if it sent one."""
        incarnation = reply.header.get("incarnation")
        if isinstance(incarnation, str):
            old = self._incarnations.get(shard)
            if old is not None and old != incarnation:
                self._restarts.append(ShardRestart(shard, old, incarnation, bool(reply.header.get("empty"))))
            self._incarnations[shard] = incarnation
            self._acknowledged.setdefault(shard, incarnation)
        if not reply.header.get("ok"):
            raise _server_error(shard, reply.header.get("error", {}))
        return reply

    def take_restarts(self) -> list[ShardRestart]:
        """Restarts noticed since the last call (the first contact with a shard is not one). From
        now on ranged pushes expect the shards' current incarnations: the caller has seen them."""
        restarts, self._restarts = self._restarts, []
        self._acknowledged.update(self._incarnations)
        return restarts

    def _open(self, shard: int) -> None:
        """Connect, and on a new connection authenticate with the hello frame (the server accepts
        nothing else first) and check the server is the shard this client thinks it is (a wrong
        order of addresses would silently route ids to the wrong shards)."""
        conn = self._conns[shard]
        if not conn.open():
            return
        conn.send({"op": "hello", "token": self.token} if self.token else {"op": "hello"}, None)
        hello = self._check(shard, conn.recv()).header
        if (hello["shard"], hello["num_shards"]) != (shard, self.num_shards):
            conn.close()
            raise ParamServerError(
                "Misconfigured",
                f"{conn.address} is shard {hello['shard']} of {hello['num_shards']}, "
                f"expected shard {shard} of {self.num_shards}",
                shard,
            )

    def _send(self, shard: int, header: dict[str, Any], arrays: dict[str, np.ndarray] | None) -> None:
        self._open(shard)
        self._conns[shard].send(header, arrays)

    def _exchange(self, shard: int, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> Message:
        """One request and its (first) reply, retried on connection loss."""
        for attempt in range(self.retries + 1):
            try:
                self._send(shard, header, arrays)
                return self._check(shard, self._conns[shard].recv())
            except OSError as exc:  # ConnectionError and socket timeouts are OSErrors
                self._conns[shard].close()
                if attempt == self.retries:
                    raise ConnectionError(f"shard {shard} ({self.addresses[shard]}): {exc}") from exc
                time.sleep(self.retry_backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _fanout(self, requests: Mapping[int, Request]) -> dict[int, Message]:
        """Send every request, then read every reply; shards that failed are retried one by one."""
        results = self._gather(requests)
        for result in results.values():
            if isinstance(result, ParamServerError):
                raise result
        return results  # type: ignore[return-value]

    def _gather(self, requests: Mapping[int, Request]) -> dict[int, Message | ParamServerError]:
        """Like `_fanout`, but every shard's answer, its error included (connection loss still raises)."""
        sent, failed, replies = [], [], {}
        for shard, (header, arrays) in requests.items():
            try:
                self._send(shard, header, arrays)
                sent.append(shard)
            except OSError:
                self._conns[shard].close()
                failed.append(shard)
        for shard in sent:
            try:
                replies[shard] = self._conns[shard].recv()
            except OSError:
                self._conns[shard].close()
                failed.append(shard)
        results: dict[int, Message | ParamServerError] = {}
        for shard, reply in replies.items():
            try:
                results[shard] = self._check(shard, reply)
            except ParamServerError as exc:
                results[shard] = exc
        for shard in failed:
            try:
                results[shard] = self._exchange(shard, *requests[shard])
            except ParamServerError as exc:
                results[shard] = exc
        return results

    def _all(self, header: dict[str, Any]) -> list[Message]:
        replies = self._fanout({shard: (header, {}) for shard in range(self.num_shards)})
        return [replies[shard] for shard in range(self.num_shards)]

    def _split(self, keys: Keys) -> list[tuple[int, np.ndarray | None]]:
        """(shard, positions in the batch) per shard with ids; positions None = the whole batch."""
        if self.num_shards == 1:
            return [(0, None)]
        shards = self.shard_of(keys)
        return [(s, np.flatnonzero(shards == s)) for s in np.unique(shards).tolist()]

    # ---- tables -------------------------------------------------------------------------------

    def create_table(
        self,
        name: str,
        dim: int,
        *,
        scalars: int = 0,
        key_type: str = "str",
        optimizer: str = "adagrad",
        lr: float = 0.01,
        scalar_lr: float | None = None,
        initial_accumulator: float = 0.0,
        init_std: float = 0.01,
        seed: int = 0,
        min_count: int = 1,
        ttl: float | None = None,
        max_rows: int | None = None,
    ) -> dict[str, Any]:
        """Create the table on every shard (idempotent; a different spec is an error).
        `max_rows` is per shard; None: the server's default (`--max-rows`)."""
        spec = TableSpec(
            name=name,
            dim=dim,
            scalars=scalars,
            key_type=key_type,
            optimizer=OptimizerSpec(optimizer, lr, scalar_lr, initial_accumulator=initial_accumulator),
            init_std=init_std,
            seed=seed,
            min_count=min_count,
            ttl=ttl,
            **({"max_rows": max_rows} if max_rows else {}),
        )
        self._all({"op": "create_table", "spec": {**spec.to_dict(), "max_rows": max_rows or None}})
        return self.table_info(name)

    def drop_table(self, name: str) -> bool:
        """Idempotent; True if some shard had the table."""
        return any(reply.header["dropped"] for reply in self._all({"op": "drop_table", "table": name}))

    def tables(self) -> dict[str, dict[str, Any]]:
        """Per table: spec and rows/admitted/evicted (TTL)/evicted_for_room/rejected summed over shards,
        per-shard versions."""
        merged: dict[str, dict[str, Any]] = {}
        for reply in self._all({"op": "info"}):
            for table in reply.header["info"]["tables"]:
                entry = merged.setdefault(
                    table["name"],
                    {"spec": table["spec"], "rows": 0, "admitted": 0, "evicted": 0, "evicted_for_room": 0, "rejected": 0, "versions": []},
                )
                for key in ("rows", "admitted", "evicted", "evicted_for_room", "rejected"):
                    entry[key] += table[key]
                entry["versions"].append(table["version"])
        return merged

    def table_info(self, name: str) -> dict[str, Any]:
        try:
            return self.tables()[name]
        except KeyError:
            raise ParamServerError("KeyError", f"no table named {name!r}", 0) from None

    def pull(self, table: str, ids: IdsLike, learned: bool = False) -> Rows:
        """The rows of `ids`; `learned`: with the watermarks of the pushes they have learned
        (`Rows.learned`), read atomically with them on each shard."""
        keys = as_keys(ids)
        parts = self._split(keys)
        header = {"op": "pull", "table": table, **({"learned": True} if learned else {})}
        requests = {shard: (header, keys_arrays(keys if pos is None else keys.take(pos))) for shard, pos in parts}
        replies = self._fanout(requests)
        marks = lowest_watermarks([reply.header.get("learned", {}) for reply in replies.values()]) if learned else None
        if len(parts) == 1 and parts[0][1] is None:
            reply = replies[0]
            return Rows(reply.arrays["values"], reply.arrays["found"], reply.header["dim"], learned=marks)
        first = next(iter(replies.values()))
        values = np.empty((len(keys), first.arrays["values"].shape[1]), np.float32)
        found = np.empty(len(keys), bool)
        for shard, pos in parts:
            values[pos] = replies[shard].arrays["values"]
            found[pos] = replies[shard].arrays["found"]
        return Rows(values, found, first.header["dim"], learned=marks)

    def pull_many(self, requests: Mapping[str, IdsLike]) -> dict[str, Rows]:
        """Several tables' pulls in one round trip per shard: every request is written before any
        reply is read (the server answers a connection's frames in order)."""
        plan: list[tuple[str, Keys, list[tuple[int, np.ndarray | None]]]] = []
        for table, ids in requests.items():
            keys = as_keys(ids)
            plan.append((table, keys, self._split(keys)))
        try:
            for table, keys, parts in plan:
                for shard, pos in parts:
                    self._send(shard, {"op": "pull", "table": table}, keys_arrays(keys if pos is None else keys.take(pos)))
            replies = [[self._check(shard, self._conns[shard].recv()) for shard, _ in parts] for _, _, parts in plan]
        except OSError:  # a lost connection mid-pipeline: reconnect and fall back to one call per table
            for conn in self._conns:
                conn.close()
            return {table: self.pull(table, keys) for table, keys, _ in plan}
        result = {}
        for (table, keys, parts), table_replies in zip(plan, replies):
            if len(parts) == 1 and parts[0][1] is None:
                reply = table_replies[0]
                result[table] = Rows(reply.arrays["values"], reply.arrays["found"], reply.header["dim"])
                continue
            width = table_replies[0].arrays["values"].shape[1]
            values, found = np.empty((len(keys), width), np.float32), np.empty(len(keys), bool)
            for (_, pos), reply in zip(parts, table_replies):
                values[pos], found[pos] = reply.arrays["values"], reply.arrays["found"]
            result[table] = Rows(values, found, table_replies[0].header["dim"])
        return result

    def push(
        self,
        updates: Mapping[str, tuple[IdsLike, np.ndarray | tuple[np.ndarray, np.ndarray]]],
        *,
        meta: Any = None,
        events: int = 0,
        event_time: float | None = None,
        ranges: Mapping[str, tuple[int, int]] | None = None,
        item_counts: tuple[Sequence[str], np.ndarray] | None = None,
    ) -> PushOutcome:
        """Apply gradients to several tables as one update per shard.

        grads: (n, dim + scalars) float32, or (vector_grads, scalar_grads). `meta` (small JSON) is
        stored by every shard atomically with its part of the update; `events` is credited once
        (to shard 0). `event_time` (seconds) drives TTL expiry and eviction order; default: now.

        `ranges` ({"topic/partition": (a, b)}: the offsets this push covers) makes the push
        exactly-once: every shard receives it and applies it only if it continues its watermarks
        (see docs/param_server.md), carrying this client's claimed epochs. `item_counts` (item ids,
        int64 counts) is added on every shard that applies the push. A refusal raises Fenced or
        OffsetsRefused (Fenced first) once every shard has answered, with `outcome` telling what
        the other shards did; the push is atomic per shard, not across shards.
        """
        self._seq += 1
        per_shard: dict[int, Request] = {}
        for name, (ids, grads) in updates.items():
            keys = as_keys(ids)
            matrix = _as_matrix(grads)
            for shard, pos in self._split(keys):
                header, arrays = per_shard.setdefault(shard, ({"tables": []}, {}))
                i = len(header["tables"])
                header["tables"].append(name)
                arrays.update(keys_arrays(keys if pos is None else keys.take(pos), f"ids{i}"))
                arrays[f"grads{i}"] = matrix if pos is None else matrix[pos]
        everywhere = meta is not None or ranges is not None or item_counts is not None
        targets = range(self.num_shards) if everywhere else ([0] if events else [])
        for shard in targets:
            per_shard.setdefault(shard, ({"tables": []}, {}))
        wire_ranges = None if ranges is None else {pkey: [int(a), int(b)] for pkey, (a, b) in ranges.items()}
        counted = None
        if item_counts is not None:
            counted = {**keys_arrays(Keys.from_strings(list(item_counts[0])), "counted"), "counts": np.asarray(item_counts[1], np.int64)}
        requests = {}
        for shard, (header, arrays) in per_shard.items():
            header.update(op="push", client_id=self._client_id, seq=self._seq, event_time=event_time)
            if meta is not None:
                header["meta"] = meta
            if events and shard == 0:
                header["events"] = int(events)
            if wire_ranges is not None:
                header["ranges"] = wire_ranges
                header["epochs"] = {pkey: self._epochs[shard][pkey] for pkey in wire_ranges if pkey in self._epochs[shard]}
                if shard in self._acknowledged:
                    header["incarnation"] = self._acknowledged[shard]
            if counted is not None:
                arrays.update(counted)
            requests[shard] = (header, arrays)
        results = self._gather(requests)
        outcome = PushOutcome(
            applied=sorted(s for s, r in results.items() if isinstance(r, Message) and r.header["applied"]),
            skipped=sorted(s for s, r in results.items() if isinstance(r, Message) and not r.header["applied"]),
        )
        errors = [r for r in results.values() if isinstance(r, ParamServerError)]
        if errors:  # the one that decides what the caller does next: fenced, then refused, then the rest
            first = min(errors, key=lambda e: (not isinstance(e, Fenced), not isinstance(e, OffsetsRefused), e.shard))
            first.outcome = outcome
            raise first
        return outcome

    def claim(self, pkeys: Sequence[str]) -> list[dict[str, int]]:
        """Take ownership of partitions on every shard: each gives them a new fencing epoch, which
        this client attaches to its ranged pushes from now on (older owners' pushes are refused).
        Returns each shard's watermarks of `pkeys` (missing: none yet)."""
        replies = self._all({"op": "claim", "pkeys": list(pkeys)})
        for shard, reply in enumerate(replies):
            self._epochs[shard].update(reply.header["epochs"])
        return [reply.header["next_offsets"] for reply in replies]

    def watermarks(self) -> list[dict[str, int]]:
        """Per shard: the next offset it will apply, per partition key."""
        return [reply.header["next_offsets"] for reply in self._all({"op": "watermarks"})]

    def item_event_counts(self) -> list[dict[str, int]]:
        """Per shard: events applied per item (every shard counts every item of what it applied)."""
        return [reply.header["counts"] for reply in self._all({"op": "item_counts"})]

    def assign(
        self, table: str, ids: IdsLike, vectors: np.ndarray, scalars: np.ndarray | None = None, *, only_new: bool = False
    ) -> dict[int, int]:
        """Replace rows' values (bulk load / refit), creating rows as needed; bypasses optimiser
        and admission. `only_new`: only ids without a row get one, existing rows keep their values
        (decided on each shard under its lock, so a row the online trainer created since the caller
        looked is never overwritten: cold-start seeding). Returns {shard: version}."""
        keys = as_keys(ids)
        matrix = _as_matrix(vectors if scalars is None else (vectors, scalars))
        requests = {
            shard: ({"op": "assign", "table": table, "only_new": only_new}, {**keys_arrays(keys if pos is None else keys.take(pos)), "values": matrix if pos is None else matrix[pos]})
            for shard, pos in self._split(keys)
        }
        return {shard: reply.header["version"] for shard, reply in self._fanout(requests).items()}

    # ---- sync ---------------------------------------------------------------------------------

    def _since(self, since: int | Sequence[int]) -> list[int]:
        if isinstance(since, (int, np.integer)):
            return [int(since)] * self.num_shards
        since = [int(v) for v in since]
        if len(since) != self.num_shards:
            raise ValueError(f"since has {len(since)} versions for {self.num_shards} shards")
        return since

    def delta_chunks(self, table: str, since: int | Sequence[int] = 0, chunk_rows: int = 65536) -> Iterator[DeltaChunk]:
        """Changed rows shard by shard, in chunks of at most chunk_rows (0: full snapshot).
        Connection loss before a shard's first chunk is retried; later it raises ConnectionError
        (call again with the same since)."""
        for shard, shard_since in enumerate(self._since(since)):
            request = {"op": "delta", "table": table, "since": shard_since, "chunk_rows": chunk_rows}
            reply = self._exchange(shard, request)
            deleted = keys_from(reply.arrays, "deleted")
            while True:
                header = reply.header
                yield DeltaChunk(shard, keys_from(reply.arrays), reply.arrays["values"], deleted, header["version"], header["reset"], header["dim"],
                                 bool(header.get("torn", False)))
                if not header["more"]:
                    break
                deleted = Keys.empty(deleted.kind)
                try:
                    reply = self._check(shard, self._conns[shard].recv())
                except OSError:
                    self._conns[shard].close()
                    raise

    def delta(self, table: str, since: int | Sequence[int] = 0) -> Delta:
        """All chunks concatenated. If some shard had to reset, every shard is re-read in full so
        the result is either a consistent delta or a complete snapshot (`full`)."""
        chunks = list(self.delta_chunks(table, since))
        if any(c.reset for c in chunks) and not all(c.reset for c in chunks):
            chunks = list(self.delta_chunks(table, 0))
        kind = chunks[0].ids.kind if len(chunks[0].ids) else chunks[0].deleted.kind
        versions = {c.shard: c.version for c in chunks}
        return Delta(
            values=np.concatenate([c.values for c in chunks]),
            found=np.ones(sum(len(c.ids) for c in chunks), bool),
            dim=chunks[0].dim,
            ids=Keys.concat([c.ids for c in chunks if len(c.ids)], kind),
            deleted=Keys.concat([c.deleted for c in chunks if len(c.deleted)], kind),
            version=tuple(versions[shard] for shard in range(self.num_shards)),
            full=all(c.reset for c in chunks),
            torn=any(c.torn for c in chunks),
        )

    # ---- blobs, meta, admin -------------------------------------------------------------------

    def _blob_shard(self, name: str) -> int:
        return int(self.shard_of([name])[0])

    def put_blob(self, name: str, data: bytes, expect: int | None = None) -> int:
        """Store bytes under a name (on the shard the name hashes to); returns its version. With a
        token the stored bytes end with their HMAC, which `get_blob` checks and strips. With
        `expect`, the put happens only if the stored version is `expect` (0: no blob yet), else
        ParamServerError of kind "BlobConflict"."""
        if self._blob_key is not None:
            data = data + blob_mac(self._blob_key, name, data)
        arrays = {"data": np.frombuffer(data, np.uint8)}
        header: dict[str, Any] = {"op": "put_blob", "name": name}
        if expect is not None:
            header["expect"] = expect
        return self._exchange(self._blob_shard(name), header, arrays).header["version"]

    def find_blob(self, name: str, since: int = 0) -> FetchedBlob | None:
        """`get_blob`, with None also for a blob never put (the server answers that with a KeyError)."""
        try:
            return self.get_blob(name, since)
        except ParamServerError as exc:
            if exc.kind == "KeyError":
                return None
            raise

    def blob_version(self, name: str) -> int | None:
        """The blob's stored version without its bytes (None: no such blob)."""
        try:
            reply = self._exchange(self._blob_shard(name), {"op": "get_blob", "name": name, "since": NEWEST})
        except ParamServerError as exc:
            if exc.kind == "KeyError":
                return None
            raise
        return int(reply.header["version"])

    def get_blob(self, name: str, since: int = 0) -> FetchedBlob | None:
        """The blob, or None if its version is not newer than `since`. With a token, a blob whose
        HMAC does not check out (altered, or put without the token) raises ParamServerError
        ("BadSignature") instead of being returned."""
        shard = self._blob_shard(name)
        reply = self._exchange(shard, {"op": "get_blob", "name": name, "since": since})
        if not reply.header["changed"]:
            return None
        data = reply.arrays["data"].tobytes()
        if self._blob_key is not None:
            data, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
            if len(mac) != MAC_BYTES or not hmac.compare_digest(mac, blob_mac(self._blob_key, name, data)):
                raise ParamServerError("BadSignature", f"blob {name!r} is not signed with this token (altered or forged)", shard)
        return FetchedBlob(data, reply.header["version"])

    def blobs(self) -> dict[str, int]:
        """Every blob's name and version."""
        merged: dict[str, int] = {}
        for reply in self._all({"op": "get_blob"}):
            merged.update(reply.header["blobs"])
        return merged

    def get_meta(self) -> list[dict[str, Any]]:
        """Per shard: the meta of the last push it received, its version, applied events."""
        return [reply.header["meta"] for reply in self._all({"op": "meta"})]

    def applied_events(self) -> int:
        return sum(record["applied_events"] for record in self.get_meta())

    def info(self) -> list[dict[str, Any]]:
        return [reply.header["info"] for reply in self._all({"op": "info"})]

    def checkpoint(self) -> list[dict[str, Any]]:
        """Force a checkpoint on every shard now; per shard: path, version, seconds."""
        return [reply.header for reply in self._all({"op": "checkpoint"})]


def _as_matrix(grads: np.ndarray | tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    if isinstance(grads, tuple):
        vectors, scalars = (np.asarray(g, np.float32) for g in grads)
        grads = np.hstack([vectors, scalars.reshape(len(scalars), -1)])
    return np.ascontiguousarray(grads, dtype=np.float32)
