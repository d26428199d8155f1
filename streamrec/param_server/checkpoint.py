"""Checkpoint files: atomic, checksummed, numpy raw buffers plus a JSON header (never pickle).

File layout (all integers little-endian):
  0   8 bytes  magic b"SRPSCKP1"
  8   u64      header length H
  16  H bytes  header, UTF-8 JSON (see docs/param_server.md), padded with spaces to a 64-byte boundary
  ..           array data: each array C-contiguous raw bytes at header["arrays"][name]["offset"]
               (relative to the start of the data section), 64-byte aligned
  end 32 bytes digest of every byte before it: HMAC-SHA256 under a key derived from the server's
               token when one is set (see signing.py), plain SHA-256 otherwise

Written to `<name>.tmp`, fsynced, renamed, then the directory fsynced, so a crash leaves either the
old set of checkpoints or the new one. Loading verifies the digest (the
HMAC when the server has a token: a file with only a plain checksum is then refused) before parsing anything, then
the contents (format version, shard layout, shapes, row bookkeeping); a file that fails any check
is skipped for the next older one.

A checkpoint is the store at one version without holding the store lock for the whole copy: under
the lock it takes the small state (meta, watermarks, epochs, item counts, each table's per-row
bookkeeping); each table's block of values and optimiser state is then streamed into the file in
chunks by a `BlockSnapshot`, which keeps the old bytes of rows that pushes change meanwhile.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from streamrec.param_server.defaults import DEFAULT_KEEP_CHECKPOINTS, DEFAULT_MAX_ROWS
from streamrec.param_server.item_counts import ItemEventCounts
from streamrec.param_server.keys import Keys
from streamrec.param_server.ledger import PartitionLedger
from streamrec.param_server.protocol import ALLOWED_DTYPES, raw_bytes, view_array
from streamrec.param_server.routing import ROUTING
from streamrec.param_server.signing import hasher, key_id
from streamrec.param_server.snapshot import BlockSnapshot
from streamrec.param_server.store import ParamStore, StoredBlob
from streamrec.param_server.table import Table

MAGIC = b"SRPSCKP1"
FORMAT_VERSION = 2  # 2: one `block` array per table, watermarks, epochs, item counts, evicted_for_room
Source = np.ndarray | BlockSnapshot
DIGEST_BYTES = 32
ALIGN = 64
log = logging.getLogger(__name__)


class CorruptCheckpoint(ValueError):
    """The file is truncated, altered or not a checkpoint: it is reported and never loaded."""


RESHARD_STAGING = ".reshard-staging"  # `param-server reshard` writes the new shards here, then moves them in


class UnfinishedReshard(ValueError):
    """The checkpoint directory is the target of a reshard that has not finished: some shards may
    not be there yet, and a shard that starts without its checkpoints starts empty."""


class RoutingMismatch(ValueError):
    """A multi-shard checkpoint laid out under another routing scheme. Its rows would sit on the
    wrong shards (pulls would miss them and pushes would create fresh rows beside them), and falling
    back to an older checkpoint would not help: the server refuses to start instead."""


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Snapshot:
    """The store at one version: header, arrays (some streamed), and the tables to release after."""

    header: dict[str, Any]
    arrays: dict[str, Source]
    tables: list[Table]

    def release(self, store: ParamStore) -> None:
        with store.lock:
            for table in self.tables:
                table.end_checkpoint()


def snapshot(store: ParamStore) -> Snapshot:
    """Take the store's state at its current version; blocks are read later (see module doc).
    The caller must `release` it once written (or on failure)."""
    arrays: dict[str, Source] = {}
    tables, blobs = [], []
    with store.lock:
        live = list(store.tables.values())
        for i, table in enumerate(live):
            header, table_arrays = table.checkpoint_view(store.lock)
            header["arrays"] = {name: f"t{i}.{name}" for name in table_arrays}
            arrays.update({f"t{i}.{name}": array for name, array in table_arrays.items()})
            tables.append(header)
        for i, (name, blob) in enumerate(store.blobs.items()):
            arrays[f"b{i}"] = np.frombuffer(blob.data, np.uint8)
            blobs.append({"name": name, "version": blob.version, "array": f"b{i}"})
        counts = dict(store.item_counts.counts)
        header = {
            "format": FORMAT_VERSION,
            "shard": store.shard,
            "num_shards": store.num_shards,
            "routing": ROUTING,
            "version": store.version,
            "created_at": time.time(),
            "meta": store.meta,
            "meta_version": store.meta_version,
            "applied_events": store.applied_events,
            "pushes": store.pushes,
            "skipped_pushes": store.skipped_pushes,
            "next_offsets": dict(store.ledger.next_offsets),
            "epochs": dict(store.ledger.epochs),
            "tables": tables,
            "blobs": blobs,
        }
    items = Keys.from_strings(list(counts))
    arrays.update({"items.blob": items.blob, "items.offsets": items.offsets,
                   "items.counts": np.fromiter(counts.values(), np.int64, len(counts))})
    return Snapshot(header, arrays, live)


def write(path: Path, header: dict[str, Any], arrays: dict[str, Source], key: bytes | None = None) -> None:
    layout, offset = {}, 0
    for name, array in arrays.items():
        nbytes = int(np.prod(array.shape)) * array.dtype.itemsize
        layout[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset}
        offset = _aligned(offset + nbytes)
    body = orjson.dumps({**header, "key_id": key_id(key), "arrays_layout": layout})
    body += b" " * (_aligned(16 + len(body)) - 16 - len(body))
    digest = hasher(key)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as out:

            def emit(chunk: bytes | memoryview) -> None:
                digest.update(chunk)
                out.write(chunk)

            emit(MAGIC + struct.pack("<Q", len(body)) + body)
            written = 0
            for name, array in arrays.items():
                emit(b"\0" * (layout[name]["offset"] - written))
                written = layout[name]["offset"]
                for chunk in array.chunks() if isinstance(array, BlockSnapshot) else [array]:
                    emit(raw_bytes(chunk))
                    written += chunk.nbytes
            out.write(digest.digest())
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        # a full disk: the partial file would hold the space the next checkpoint (or anything
        # else on that disk) needs until the next save cleared it, and a final one never is
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _signed_by(path: Path) -> str | None:
    """The `key_id` a checkpoint's header names, read without the rest of the file; None for a file
    written before headers named it. "unreadable" for a file whose header cannot be read: it is
    not pruned either."""
    try:
        with open(path, "rb") as file:
            start = file.read(16)
            if len(start) < 16 or start[:8] != MAGIC:
                return "unreadable"
            (header_len,) = struct.unpack_from("<Q", start, 8)
            if header_len > 1 << 30:
                return "unreadable"
            header = orjson.loads(file.read(header_len))
    except (OSError, orjson.JSONDecodeError):
        return "unreadable"
    found = header.get("key_id") if isinstance(header, dict) else "unreadable"
    return found if isinstance(found, str) or found is None else "unreadable"


def _file_bytes(path: Path) -> bytes:
    """The bytes of a checkpoint file, after refusing (CorruptCheckpoint) what cannot be one before
    reading it: anything but a regular file (a FIFO in its place blocked startup for good; it is
    opened without blocking to find out) or a file larger than this machine's memory (a sparse
    200 GB file ended startup with a MemoryError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptCheckpoint(f"{path}: not a regular file")
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if info.st_size > memory:
            raise CorruptCheckpoint(f"{path}: {info.st_size} bytes, more than this machine's memory ({memory})")
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read()
    finally:
        os.close(fd)


def read(path: Path, key: bytes | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header and arrays (views of the file's bytes); CorruptCheckpoint unless everything checks,
    the HMAC under `key` first when there is one."""
    data = _file_bytes(path)
    if len(data) < 16 + DIGEST_BYTES or data[:8] != MAGIC:
        raise CorruptCheckpoint(f"{path}: not a checkpoint or truncated")
    digest = hasher(key)
    digest.update(memoryview(data)[:-DIGEST_BYTES])
    if not hmac.compare_digest(digest.digest(), data[-DIGEST_BYTES:]):
        if key is not None:
            raise CorruptCheckpoint(f"{path}: signature mismatch (not signed with this server's token, altered, or truncated)")
        raise CorruptCheckpoint(f"{path}: checksum mismatch (truncated, corrupted, or signed: set the server's token)")
    (header_len,) = struct.unpack_from("<Q", data, 8)
    start = 16 + header_len
    try:
        header = orjson.loads(data[16:start])
        arrays = {}
        for name, spec in header.pop("arrays_layout").items():
            if spec["dtype"] not in ALLOWED_DTYPES:
                raise CorruptCheckpoint(f"{path}: array {name} has disallowed dtype {spec['dtype']}")
            array = arrays[name] = view_array(data, spec["dtype"], spec["shape"], start + spec["offset"])
            if start + spec["offset"] + array.nbytes > len(data) - DIGEST_BYTES:
                raise CorruptCheckpoint(f"{path}: array {name} runs past the end of the data")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpoint(f"{path}: malformed header or layout: {exc}") from exc
    if header.get("format") != FORMAT_VERSION:
        raise CorruptCheckpoint(f"{path}: unsupported format {header.get('format')}")
    return header, arrays


def restore(header: dict[str, Any], arrays: dict[str, np.ndarray], default_max_rows: int = DEFAULT_MAX_ROWS) -> ParamStore:
    """The store a checkpoint describes (a new incarnation, not empty). KeyError, ValueError or
    TypeError when its contents do not fit together."""
    store = ParamStore(header["shard"], header["num_shards"], previous_version=int(header["version"]), empty=False,
                       default_max_rows=default_max_rows)
    for table_header in header["tables"]:
        table_arrays = {name: arrays[key] for name, key in table_header.pop("arrays").items()}
        table = Table.restore(table_header, table_arrays, start_version=store.version)
        if table.spec.name in store.tables:
            raise ValueError(f"table {table.spec.name!r} appears twice")
        store.tables[table.spec.name] = table
    for blob in header["blobs"]:
        store.blobs[blob["name"]] = StoredBlob(arrays[blob["array"]].tobytes(), int(blob["version"]))
    store.meta, store.meta_version = header["meta"], int(header["meta_version"])
    store.applied_events, store.pushes = int(header["applied_events"]), int(header["pushes"])
    store.skipped_pushes = int(header["skipped_pushes"])
    next_offsets, epochs = header["next_offsets"], header["epochs"]
    if not all(isinstance(v, int) for v in [*next_offsets.values(), *epochs.values()]):
        raise ValueError("watermarks and epochs must be integers")
    store.ledger = PartitionLedger(next_offsets, epochs)
    items = Keys(blob=arrays["items.blob"], offsets=arrays["items.offsets"]).checked()
    counts = arrays["items.counts"]
    if counts.shape != (len(items),) or counts.dtype != np.int64:
        raise ValueError(f"{len(items)} counted items but item counts of shape {counts.shape}")
    store.item_counts = ItemEventCounts(dict(zip(items.to_list(), counts.tolist())))
    return store


@dataclass
class CheckpointResult:
    path: Path
    version: int
    seconds: float
    bytes: int


@dataclass(frozen=True)
class LoadedCheckpoint:
    store: ParamStore
    path: Path
    created_at: float


class CheckpointDir:
    """The checkpoints of one shard: `<root>/shard-<i>-of-<n>/ckpt-<version>.srps`, newest `keep` kept."""

    def __init__(self, root: Path, shard: int, num_shards: int, keep: int = DEFAULT_KEEP_CHECKPOINTS, key: bytes | None = None):
        """`key`: sign and verify with HMAC-SHA256 under it (derived from the server's token)."""
        if keep < 1:
            raise ValueError("keep at least one checkpoint")
        self.key = key
        self.dir = Path(root) / f"shard-{shard}-of-{num_shards}"
        self.shard, self.num_shards, self.keep = shard, num_shards, keep
        self.rejected: list[str] = []  # messages about checkpoints that failed to load and were skipped
        self.unloadable: set[Path] = set()  # their files: never pruned (see `save`)

    def files(self) -> list[Path]:
        """Newest first."""
        return sorted(self.dir.glob("ckpt-*.srps"), reverse=True)

    def save(self, store: ParamStore) -> CheckpointResult:
        started = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tmp"):  # left by a crash mid-write
            stale.unlink(missing_ok=True)
        taken = snapshot(store)
        try:
            path = self.dir / f"ckpt-{taken.header['version']:020d}.srps"
            write(path, taken.header, taken.arrays, self.key)
        finally:
            taken.release(store)
        # a file that did not load, or that another key signed, is kept: a shard started without
        # its token (or with a wrong one) rejects every signed checkpoint, or restarted once more,
        # loads its own newest and never tries them; pruning used to delete them after `keep`
        # saves, so fixing the token found nothing left to restore
        ours = key_id(self.key)
        for old in [f for f in self.files() if f not in self.unloadable and _signed_by(f) in (ours, None)][self.keep :]:
            old.unlink(missing_ok=True)
        return CheckpointResult(path, taken.header["version"], time.perf_counter() - started, path.stat().st_size)

    def load(self, path: Path, default_max_rows: int = DEFAULT_MAX_ROWS, any_routing: bool = False) -> LoadedCheckpoint:
        """One checkpoint, or CorruptCheckpoint for any reason it cannot be restored as it is;
        RoutingMismatch for a multi-shard layout of another routing, unless `any_routing` (the
        resharder, which re-routes every row anyway)."""
        header, arrays = read(path, self.key)
        if (header.get("shard"), header.get("num_shards")) != (self.shard, self.num_shards):
            raise CorruptCheckpoint(f"{path}: belongs to shard {header.get('shard')} of {header.get('num_shards')}")
        routing = header.get("routing", "modulo")  # checkpoints before rendezvous routing say nothing
        if self.num_shards > 1 and routing != ROUTING and not any_routing:
            raise RoutingMismatch(
                f"{path}: its rows are routed by {routing!r}, this release routes by {ROUTING!r}; re-lay the "
                f"checkpoints out first: streamrec param-server reshard --from {self.dir.parent} --to NEW_DIR "
                f"--shards {self.num_shards}, then start the shards on NEW_DIR")
        try:
            return LoadedCheckpoint(restore(header, arrays, default_max_rows), path, float(header["created_at"]))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise CorruptCheckpoint(f"{path}: inconsistent contents: {type(exc).__name__}: {exc}") from exc

    def load_newest(self, default_max_rows: int = DEFAULT_MAX_ROWS, any_routing: bool = False) -> LoadedCheckpoint | None:
        """The newest checkpoint that loads; the ones that do not are logged, recorded and skipped."""
        for path in self.files():
            try:
                return self.load(path, default_max_rows, any_routing)
            except (CorruptCheckpoint, OSError, MemoryError) as exc:
                reason = str(exc) or f"{path}: {type(exc).__name__}"
                log.error("skipping checkpoint: %s", reason)
                self.rejected.append(reason)
                self.unloadable.add(path)
        return None
