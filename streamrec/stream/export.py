"""`streamrec export --to parquet PATH`: the interaction log as one Parquet file.

Parquet is the interchange with engines outside this process (Spark refits read it: Spark's Kafka
connector is not at hand offline, and a columnar file is what a cluster reads in parallel). The
columns are the canonical log's, so `--format parquet` reads the file back unchanged:
`user_id`, `item_id` (strings), `timestamp` (float64 epoch seconds), `rating` (float64, null where
the event carries none) and `event_type` (string), in time order. The file is written beside its
target and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import os
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
        "event_type": pa.array(log.event_types().astype(str), pa.string()),
    })


def export_parquet(log: InteractionLog, path: Path) -> dict[str, Any]:
    """Write `log` to `path` atomically; returns what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(log_table(log), tmp, row_group_size=ROW_GROUP, compression="zstd")
    os.replace(tmp, path)
    return {"path": str(path), "rows": len(log), "users": len(id_codes(log.user_id)[1]),
            "items": len(id_codes(log.item_id)[1]), "bytes": path.stat().st_size,
            "source": log.source}
