"""`streamrec export --to parquet PATH`: the interaction log as one Parquet file.

Parquet is the interchange with engines outside this process (Spark refits read it: Spark's Kafka
connector is not at hand offline, and a columnar file is what a cluster reads in parallel). The
columns are the canonical log's, so `--format parquet` reads the file back unchanged:
`user_id`, `item_id` (strings), `timestamp` (float64 epoch seconds), `rating` (float64, null where
the event carries none) and `event_type` (string), in time order. The file is written to a temporary
file of its own beside its target and renamed into place, so a reader never sees half of it and two
exports to one path each install a whole file (the last rename wins).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamrec.stream.loaders import InteractionLog, id_codes, id_strings

ROW_GROUP = 1 << 20  # rows per row group: the unit a Spark task reads


def log_table(log: InteractionLog) -> pa.Table:
    """The log's canonical columns as an Arrow table."""
    return pa.table({
        "user_id": pa.array(id_strings(log.user_id), pa.string()),
        "item_id": pa.array(id_strings(log.item_id), pa.string()),
        "timestamp": pa.array(log.timestamp, pa.float64()),
        "rating": pa.array(log.rating, pa.float64(), mask=~np.isfinite(log.rating)),
        "event_type": pa.array(id_strings(log.event_types()), pa.string()),  # not numpy's NUL-cutting str
    })


def _new_temporary(target: Path) -> Path:
    """A new, empty file of this export alone beside `target`: `tempfile.mkstemp` with the mode a
    plain new file gets (0o666 less the umask, as before) where mkstemp's is owner-only, which a
    Spark job running as another user could not read."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def export_parquet(log: InteractionLog, path: Path) -> dict[str, Any]:
    """Write `log` to `path` atomically; returns what was written.

    The temporary file is unique: a fixed `.NAME.tmp` was shared by concurrent exports to one path,
    which then wrote into the same file, leaving a torn result or crashing one of them, while the
    other reported success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        pq.write_table(log_table(log), tmp, row_group_size=ROW_GROUP, compression="zstd")
        size = tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(path), "rows": len(log), "users": len(id_codes(log.user_id)[1]),
            "items": len(id_codes(log.item_id)[1]), "bytes": size, "source": log.source}
