"""Checkpoint files: atomic, checksummed, numpy raw buffers plus a JSON header (never pickle).

File layout (all integers little-endian):
  0   8 bytes  magic b"SRPSCKP1"
  8   u64      header length H
  16  H bytes  header, UTF-8 JSON (see docs/param_server.md), padded with spaces to a 64-byte boundary
  ..           array data: each array C-contiguous raw bytes at header["arrays"][name]["offset"]
               (relative to the start of the data section), 64-byte aligned
  end 32 bytes SHA-256 of every byte before it

Written to `<name>.tmp`, fsynced, renamed, then the directory fsynced, so a crash leaves either the
old set of checkpoints or the new one. Loading verifies the digest before parsing anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from streamrec.param_server.protocol import ALLOWED_DTYPES, raw_bytes, view_array
from streamrec.param_server.store import ParamStore, StoredBlob
from streamrec.param_server.table import Table

MAGIC = b"SRPSCKP1"
FORMAT_VERSION = 1
DIGEST_BYTES = 32
ALIGN = 64
log = logging.getLogger(__name__)


class CorruptCheckpoint(ValueError):
    """The file is truncated, altered or not a checkpoint: it is reported and never loaded."""


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def snapshot(store: ParamStore) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header and arrays of a consistent copy of the store, taken under its lock."""
    arrays: dict[str, np.ndarray] = {}
    tables, blobs = [], []
    with store.lock:
        for i, table in enumerate(store.tables.values()):
            header, table_arrays = table.export()
            header["arrays"] = {name: f"t{i}.{name}" for name in table_arrays}
            arrays.update({f"t{i}.{name}": array for name, array in table_arrays.items()})
            tables.append(header)
        for i, (name, blob) in enumerate(store.blobs.items()):
            arrays[f"b{i}"] = np.frombuffer(blob.data, np.uint8)
            blobs.append({"name": name, "version": blob.version, "array": f"b{i}"})
        header = {
            "format": FORMAT_VERSION,
            "shard": store.shard,
            "num_shards": store.num_shards,
            "version": store.version,
            "created_at": time.time(),
            "meta": store.meta,
            "meta_version": store.meta_version,
            "applied_events": store.applied_events,
            "pushes": store.pushes,
            "tables": tables,
            "blobs": blobs,
        }
    return header, arrays


def write(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    layout, offset = {}, 0
    for name, array in arrays.items():
        layout[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset}
        offset = _aligned(offset + array.nbytes)
    body = orjson.dumps({**header, "arrays_layout": layout})
    body += b" " * (_aligned(16 + len(body)) - 16 - len(body))
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:

        def emit(chunk: bytes | memoryview) -> None:
            digest.update(chunk)
            out.write(chunk)

        emit(MAGIC + struct.pack("<Q", len(body)) + body)
        written = 0
        for name, array in arrays.items():
            emit(b"\0" * (layout[name]["offset"] - written))
            emit(raw_bytes(array))
            written = layout[name]["offset"] + array.nbytes
        out.write(digest.digest())
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header and arrays (views of the file's bytes); CorruptCheckpoint unless everything checks."""
    data = path.read_bytes()
    if len(data) < 16 + DIGEST_BYTES or data[:8] != MAGIC:
        raise CorruptCheckpoint(f"{path}: not a checkpoint or truncated")
    if hashlib.sha256(memoryview(data)[:-DIGEST_BYTES]).digest() != data[-DIGEST_BYTES:]:
        raise CorruptCheckpoint(f"{path}: checksum mismatch (truncated or corrupted)")
    (header_len,) = struct.unpack_from("<Q", data, 8)
    start = 16 + header_len
    try:
        header = orjson.loads(data[16:start])
        arrays = {}
        for name, spec in header.pop("arrays_layout").items():
            if spec["dtype"] not in ALLOWED_DTYPES:
                raise CorruptCheckpoint(f"{path}: array {name} has disallowed dtype {spec['dtype']}")
            arrays[name] = view_array(data, spec["dtype"], spec["shape"], start + spec["offset"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpoint(f"{path}: malformed header or layout: {exc}") from exc
    if header.get("format") != FORMAT_VERSION:
        raise CorruptCheckpoint(f"{path}: unsupported format {header.get('format')}")
    return header, arrays


def restore(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> ParamStore:
    store = ParamStore(header["shard"], header["num_shards"], previous_version=header["version"])
    for table_header in header["tables"]:
        table_arrays = {name: arrays[key] for name, key in table_header.pop("arrays").items()}
        table = Table.restore(table_header, table_arrays, start_version=store.version)
        store.tables[table.spec.name] = table
    for blob in header["blobs"]:
        store.blobs[blob["name"]] = StoredBlob(arrays[blob["array"]].tobytes(), blob["version"])
    store.meta, store.meta_version = header["meta"], header["meta_version"]
    store.applied_events, store.pushes = header["applied_events"], header["pushes"]
    return store


@dataclass
class CheckpointResult:
    path: Path
    version: int
    seconds: float
    bytes: int


class CheckpointDir:
    """The checkpoints of one shard: `<root>/shard-<i>-of-<n>/ckpt-<version>.srps`, newest kept."""

    def __init__(self, root: Path, shard: int, num_shards: int, keep: int = 3):
        self.dir = Path(root) / f"shard-{shard}-of-{num_shards}"
        self.shard, self.num_shards, self.keep = shard, num_shards, keep
        self.rejected: list[str] = []  # messages about checkpoints found corrupt and skipped

    def files(self) -> list[Path]:
        """Newest first."""
        return sorted(self.dir.glob("ckpt-*.srps"), reverse=True)

    def save(self, store: ParamStore) -> CheckpointResult:
        started = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        header, arrays = snapshot(store)
        path = self.dir / f"ckpt-{header['version']:020d}.srps"
        write(path, header, arrays)
        for old in self.files()[self.keep :]:
            old.unlink(missing_ok=True)
        return CheckpointResult(path, header["version"], time.perf_counter() - started, path.stat().st_size)

    def load_newest(self) -> tuple[ParamStore, Path] | None:
        """The newest checkpoint that verifies; corrupt ones are logged, recorded and skipped."""
        for path in self.files():
            try:
                header, arrays = read(path)
                if (header["shard"], header["num_shards"]) != (self.shard, self.num_shards):
                    raise CorruptCheckpoint(f"{path}: belongs to shard {header['shard']} of {header['num_shards']}")
                return restore(header, arrays), path
            except CorruptCheckpoint as exc:
                log.error("skipping checkpoint: %s", exc)
                self.rejected.append(str(exc))
        return None
