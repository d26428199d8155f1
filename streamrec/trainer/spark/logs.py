"""The interaction log of a Spark refit: the Parquet that `streamrec export --to parquet` writes,
read by Spark (a cluster's executors read its row groups in parallel) and handed to the driver's
id index through Arrow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamrec.stream.loaders import InteractionLog, time_order
from streamrec.trainer.spark.session import spark

COLUMNS = ("user_id", "item_id", "timestamp", "rating", "event_type")


def read_parquet_log(path: str | Path) -> InteractionLog:
    """The log at `path` (a file or a folder of parts) in time order; ValueError when a column of
    the export is missing."""
    frame = spark().read.parquet(str(path))
    missing = [name for name in COLUMNS if name not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a streamrec export, missing columns {missing} (write it with "
                         "`streamrec export --to parquet`)")
    rows = frame.select(*COLUMNS).toPandas()
    log = InteractionLog(
        user_id=rows["user_id"].astype(str).to_numpy(dtype=object),
        item_id=rows["item_id"].astype(str).to_numpy(dtype=object),
        rating=rows["rating"].to_numpy(dtype=np.float64, na_value=np.nan),
        timestamp=rows["timestamp"].to_numpy(dtype=np.float64),
        event_type=rows["event_type"].astype(str).to_numpy(dtype=object),
        source=f"parquet:{path}",
    )
    return log.take(time_order(log))
