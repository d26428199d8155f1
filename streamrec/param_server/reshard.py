"""Re-split a parameter server's checkpoints from n shards to m, offline (`param-server reshard`).

Why offline: a shard is one process holding its rows in memory, and the exactly-once rule lives in
each shard's watermarks. Moving rows between live shards would need a second protocol for rows in
flight; re-splitting stopped shards' newest checkpoints needs none. Stop the trainer and the
shards (SIGTERM writes a final checkpoint), reshard, start m shards on the new directory, list them
in `STREAMREC_PARAM_SERVERS`, and restart the trainer and serving.

What moves, and how each part is merged:
- **rows**: every live row of every table goes to the shard `routing.shard_of` gives it among m,
  whole (values, optimiser state, version, event time; `Table.adopt`). With rendezvous routing,
  going from n to n + 1 shards moves about 1/(n + 1) of the rows; the report counts them.
- **watermarks** (the next offset per partition): every ranged push reaches every shard, so in a
  settled system all shards agree, and the new shards take that value. Where shards disagree (a
  push applied on some shards only, before a crash), no per-row choice is exact: the higher mark
  would lose the lagging shard's missing events, the lower would apply the others' twice. The
  resharder refuses, naming the partitions; running the trainer once more on the old layout lets
  the lagging shards catch up (it replays exactly the missing ranges there).
- **fencing epochs**: the largest per partition, so no older owner's push is accepted afterwards.
- **meta** (replicated): the newest (`meta_version`); **per-item event counts** (replicated): the
  largest per item, equal everywhere when the watermarks agree.
- **blobs** (one shard each, by name): re-routed by name.
- **admission sketches**: summed, which keeps count-min's guarantee (it never undercounts).
- **counters**: applied events, pushes, skipped pushes, evictions and rejections are summed onto
  shard 0 (shard 0 is where `events` is credited anyway); `admitted` restarts at each shard's rows.

Every new checkpoint is written with the production writer (`CheckpointDir.save`, signed under the
token when there is one) and loaded back before the command reports success. The inputs are read
whatever their routing, so this is also how checkpoints of the earlier modulo routing are migrated
(same shard count, new directory).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.param_server.checkpoint import RESHARD_STAGING, CheckpointDir
from streamrec.param_server.defaults import DEFAULT_KEEP_CHECKPOINTS
from streamrec.param_server.item_counts import ItemEventCounts
from streamrec.param_server.keys import Keys
from streamrec.param_server.ledger import PartitionLedger
from streamrec.param_server.routing import shard_of
from streamrec.param_server.store import ParamStore, StoredBlob
from streamrec.param_server.table import Table, TableFullError

_LAYOUT = re.compile(r"shard-(\d+)-of-(\d+)")


class ReshardError(ValueError):
    """The inputs cannot be re-split as they are; the message says what to do."""


def layouts(root: Path) -> dict[int, set[int]]:
    """Shard counts with checkpoints under `root`, and the shard indices present for each."""
    found: dict[int, set[int]] = {}
    for path in root.glob("shard-*-of-*"):
        match = _LAYOUT.fullmatch(path.name)
        if match and path.is_dir() and any(path.glob("ckpt-*.srps")):
            found.setdefault(int(match[2]), set()).add(int(match[1]))
    return found


def source_layout(root: Path, num_shards: int | None) -> int:
    """The shard count to read: the only complete layout under `root`, or `num_shards` if given."""
    found = layouts(root)
    if num_shards is None:
        if len(found) != 1:
            described = ", ".join(f"{n} shards" for n in sorted(found)) or "no checkpoints"
            raise ReshardError(f"{root}: {described}; say which layout to read with --from-shards")
        num_shards = next(iter(found))
    missing = sorted(set(range(num_shards)) - found.get(num_shards, set()))
    if missing:
        raise ReshardError(f"{root}: no checkpoint of shard(s) {missing} of {num_shards}: every shard is needed")
    return num_shards


def agreed_watermarks(stores: list[ParamStore]) -> dict[str, int]:
    """The watermark every old shard has for each partition; ReshardError where they differ."""
    pkeys = sorted({pkey for store in stores for pkey in store.ledger.next_offsets})
    agreed, lagging = {}, []
    for pkey in pkeys:
        marks = [store.ledger.next_offsets.get(pkey) for store in stores]
        if len(set(marks)) == 1:
            agreed[pkey] = marks[0]
        else:
            lagging.append(f"{pkey}: " + ", ".join(f"shard {i} at {'none' if m is None else m}" for i, m in enumerate(marks)))
    if lagging:
        raise ReshardError(
            "the shards have not all applied the same events, so no split is exactly-once ("
            + "; ".join(lagging) + "). Start the old shards and the trainer again until every shard's "
            "watermarks agree (`ParamClient.watermarks()`), stop them with SIGTERM, then reshard")
    return agreed


def _largest_per_key(mappings: list[dict[str, int]]) -> dict[str, int]:
    """Per key, the largest value any of the mappings holds (fencing epochs, per-item counts)."""
    merged: dict[str, int] = {}
    for mapping in mappings:
        for key, value in mapping.items():
            merged[key] = max(value, merged.get(key, value))
    return merged


@dataclass
class TableMove:
    """Where one table's rows went: per new shard, and how many changed shard."""

    rows: int
    moved: int
    per_shard: list[int]


def _move_table(name: str, old: list[Table], new: list[ParamStore]) -> TableMove:
    """Adopt every live row of the old shards' `name` tables into the new stores' tables."""
    specs = {table.spec for table in old}
    if len(specs) != 1:
        raise ReshardError(f"table {name!r} has different specs on different shards: {sorted(map(str, specs))}")
    spec = specs.pop()
    targets = [Table(spec, start_version=store.version) for store in new]
    moved = 0
    for old_shard, table in enumerate(old):
        rows = table.alive_rows()
        keys = table.keys_of(rows)
        where = shard_of(keys, len(new))
        moved += int(np.count_nonzero(where != old_shard))
        for shard, target in enumerate(targets):
            pick = np.flatnonzero(where == shard)
            if not pick.size:
                continue
            chosen = rows[pick]
            try:
                target.adopt(keys.take(pick), table.block[chosen], table.row_version[chosen], table.row_time[chosen])
            except TableFullError as exc:
                raise ReshardError(f"{exc}: table {name!r} does not fit {len(new)} shards of max_rows {spec.max_rows}; "
                                   "reshard to more shards") from exc
    first = targets[0]
    first.evicted = sum(t.evicted for t in old)
    first.evicted_for_room = sum(t.evicted_for_room for t in old)
    first.rejected = sum(t.rejected for t in old)
    for target in targets:
        target.clock = max(t.clock for t in old)
        target.last_sweep = max(t.last_sweep for t in old)
        if target.sketch is not None:
            summed = np.sum([t.sketch.counts.astype(np.uint64) for t in old if t.sketch is not None], axis=0)
            target.sketch.counts = np.minimum(summed, np.iinfo(np.uint32).max).astype(np.uint32)
    for store, target in zip(new, targets):
        store.tables[name] = target
    return TableMove(sum(t.live_rows for t in old), moved, [t.live_rows for t in targets])


def split(stores: list[ParamStore], num_shards: int) -> tuple[list[ParamStore], dict[str, TableMove]]:
    """The old shards' state laid out over `num_shards` new ones (see the module doc)."""
    if num_shards < 1:
        raise ReshardError(f"--shards must be at least 1, got {num_shards}")
    watermarks = agreed_watermarks(stores)
    epochs = _largest_per_key([store.ledger.epochs for store in stores])
    counts = _largest_per_key([store.item_counts.counts for store in stores])
    newest_meta = max(stores, key=lambda store: store.meta_version)
    previous = max(store.version for store in stores)
    new = [ParamStore(shard, num_shards, previous_version=previous, empty=False) for shard in range(num_shards)]
    for store in new:
        store.meta, store.meta_version = newest_meta.meta, newest_meta.meta_version
        store.ledger = PartitionLedger(watermarks, epochs)
        store.item_counts = ItemEventCounts(counts)
    new[0].applied_events = sum(store.applied_events for store in stores)
    new[0].pushes = sum(store.pushes for store in stores)
    new[0].skipped_pushes = sum(store.skipped_pushes for store in stores)
    for store in stores:
        names = list(store.blobs)
        for name, shard in zip(names, shard_of(Keys.from_strings(names), num_shards).tolist() if names else []):
            blob = store.blobs[name]
            held = new[shard].blobs.get(name)
            if held is None or blob.version > held.version:
                new[shard].blobs[name] = StoredBlob(blob.data, blob.version)
    names = sorted({name for store in stores for name in store.tables})
    moves = {name: _move_table(name, [store.tables[name] for store in stores if name in store.tables], new) for name in names}
    return new, moves


def reshard(source: Path, target: Path, num_shards: int, *, from_shards: int | None = None, key: bytes | None = None,
            keep: int = DEFAULT_KEEP_CHECKPOINTS) -> dict[str, Any]:
    """Read the newest checkpoint of every shard under `source`, write `num_shards` shards under
    `target`, load them back, and report what moved (JSON-ready)."""
    started = time.perf_counter()
    old_count = source_layout(source, from_shards)
    staging = target / RESHARD_STAGING
    # a target that still has the staging folder holds the leftovers of a reshard that did not
    # finish (killed while moving shards in): it is done again, whole, from the untouched source
    if layouts(target).get(num_shards) and not staging.exists():
        raise ReshardError(f"{target} already holds checkpoints of {num_shards} shards: give an empty directory")
    loaded = []
    for shard in range(old_count):
        checkpoints = CheckpointDir(source, shard, old_count, key=key)
        restored = checkpoints.load_newest(any_routing=True)
        if restored is None:
            raise ReshardError(f"no checkpoint of shard {shard} of {old_count} loads: {'; '.join(checkpoints.rejected)}")
        loaded.append(restored)
    stores, moves = split([item.store for item in loaded], num_shards)
    # staged beside the target and moved in only once all are written; the staging folder goes
    # last, so while any shard is missing it is there, and a shard refuses to start on the target
    # (`unfinished_reshard`): a missing shard would start empty
    shutil.rmtree(staging, ignore_errors=True)
    for shard, store in enumerate(stores):
        CheckpointDir(staging, shard, num_shards, keep, key).save(store)
    for shard in range(num_shards):
        name = f"shard-{shard}-of-{num_shards}"
        shutil.rmtree(target / name, ignore_errors=True)  # an empty or checkpoint-less leftover
        os.replace(staging / name, target / name)
    staging.rmdir()
    written = []
    for shard, store in enumerate(stores):
        back = CheckpointDir(target, shard, num_shards, keep, key).load_newest()
        if back is None or {n: t.live_rows for n, t in back.store.tables.items()} != {n: t.live_rows for n, t in store.tables.items()}:
            raise ReshardError(f"shard {shard} of {num_shards} under {target} does not load back as written")
        written.append(back)
    rows = sum(move.rows for move in moves.values())
    moved = sum(move.moved for move in moves.values())
    return {
        "from": {"dir": str(source), "shards": old_count, "checkpoints": [str(item.path) for item in loaded]},
        "to": {"dir": str(target), "shards": num_shards, "checkpoints": [str(result.path) for result in written]},
        "rows": rows,
        "moved_rows": moved,
        "moved_fraction": moved / rows if rows else 0.0,
        "tables": {name: {"rows": move.rows, "moved_rows": move.moved, "rows_per_shard": move.per_shard} for name, move in moves.items()},
        "watermarks": stores[0].ledger.next_offsets,
        "blobs": sum(len(store.blobs) for store in stores),
        "seconds": round(time.perf_counter() - started, 3),
    }
