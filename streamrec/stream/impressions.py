"""The impressions topic's record format: what serving showed, read back by the trainer and reports.

Serving logs one impression per `/recommend` answer (`request_id`, `user_id`, the shown `items` in
order, experiment fields, `timestamp`) as JSON lines, many to a Kafka record: a Kafka client
spends tens of microseconds per record in Python, which at a thousand answers a second would take
a serving worker's time from its requests. Readers split a record back into its impressions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson
import pandas as pd

MAX_RECORD_BYTES = 512 * 1024  # JSON lines per Kafka record (the brokers' default cap is 1 MiB)


def encode_records(impressions: list[dict[str, Any]]) -> list[bytes]:
    """Impressions as JSON lines, grouped into Kafka record values of at most MAX_RECORD_BYTES (an
    impression larger than that travels alone)."""
    values: list[bytes] = []
    lines: list[bytes] = []
    size = 0
    for impression in impressions:
        line = orjson.dumps(impression)
        if lines and size + len(line) + 1 > MAX_RECORD_BYTES:
            values.append(b"\n".join(lines))
            lines, size = [], 0
        lines.append(line)
        size += len(line) + 1
    if lines:
        values.append(b"\n".join(lines))
    return values


def decode_record(value: bytes | None) -> list[dict[str, Any]]:
    """The impressions of one Kafka record of the impressions topic (raises orjson.JSONDecodeError
    on a line that is not JSON, and on a tombstone, which readers count as invalid alike)."""
    if value is None:
        raise orjson.JSONDecodeError("a record without a value (a tombstone)", "", 0)
    return [orjson.loads(line) for line in value.split(b"\n") if line]


def shown_items(impression: object) -> tuple[str, list[str]] | None:
    """(user id, shown item ids) of an impression; None when it has no string `user_id` and list
    of string `items`: readers trust no record's shape."""
    if not isinstance(impression, dict):
        return None
    user, items = impression.get("user_id"), impression.get("items")
    if not isinstance(user, str) or not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return None
    return user, items


def shown_pairs(impressions: Iterable[object]) -> tuple[np.ndarray, np.ndarray, int]:
    """(user ids, item ids, invalid): one pair per item each impression showed. An impression
    `shown_items` refuses is counted as invalid, not used."""
    parsed = list(map(shown_items, impressions))
    valid = [p for p in parsed if p is not None]
    frame = pd.DataFrame(valid, columns=["user_id", "items"], dtype=object).explode("items").dropna()
    return frame["user_id"].to_numpy(object), frame["items"].to_numpy(object), len(parsed) - len(valid)
