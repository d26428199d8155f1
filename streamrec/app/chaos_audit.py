"""Lost and duplicated events, counted independently of the deduplication that prevents them.

Each store keeps an exact count of the events it applied per item (the parameter server per shard,
`ParamClient.item_event_counts()`; the feature store, `FeatureStore.item_event_counts()`), updated
in the same atomic step as the state itself. The audit compares those counts with a count made
straight from the data: lost = the sum of the shortfalls over items, duplicated = the sum of the
excesses. It never reads the stores' offsets bookkeeping to decide what was lost.

At the end of a run the expected counts come from the log file itself. In the middle of a run (a
snapshot taken just before each fault) a store legitimately holds only a prefix of every
partition: its watermark says which (offsets below it), and the expected counts are those of the
events the topic holds below that watermark. Watermarks and counts are read twice around the
counts, and a snapshot is kept only when both reads agree, so no push lands between them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import redis

from streamrec.core.config import Settings
from streamrec.param_server.client import ParamClient
from streamrec.stream.events import EventSchema
from streamrec.stream.reader import read_records
from streamrec.stream.topics import offset_key
from streamrec.trainer.online.feature_store import FeatureStore

Counts = Mapping[str, int]


@dataclass(frozen=True)
class CountDiff:
    lost: int  # events the data has and the store lacks (sum of shortfalls)
    duplicated: int  # events the store counted more often than the data has them (sum of excesses)
    items_short: int
    items_over: int

    def to_json(self) -> dict[str, int]:
        return {"lost_events": self.lost, "duplicated_events": self.duplicated,
                "items_short": self.items_short, "items_over": self.items_over}

    def __add__(self, other: CountDiff) -> CountDiff:
        return CountDiff(self.lost + other.lost, self.duplicated + other.duplicated,
                         self.items_short + other.items_short, self.items_over + other.items_over)


NO_DIFFERENCE = CountDiff(0, 0, 0, 0)


def item_counts(items: np.ndarray) -> pd.Series:
    """Events per item id."""
    return pd.Series(items, dtype=object).value_counts()


def compare_counts(expected: pd.Series, actual: Counts) -> CountDiff:
    observed = pd.Series(actual, dtype=np.int64)
    both = expected.index.union(observed.index)
    diff = observed.reindex(both, fill_value=0).to_numpy() - expected.reindex(both, fill_value=0).to_numpy()
    return CountDiff(int(-diff[diff < 0].sum()), int(diff[diff > 0].sum()), int((diff < 0).sum()), int((diff > 0).sum()))


def compare_shards(expected: pd.Series, per_shard: Sequence[Counts]) -> list[CountDiff]:
    """Every shard counts every item of the pushes it applied, so each is held to all of `expected`."""
    return [compare_counts(expected, counts) for counts in per_shard]


@dataclass(frozen=True)
class StoreSnapshot:
    watermarks: dict[str, int]  # partition key -> next offset the store expects
    counts: dict[str, int]  # item -> events applied


def consistent(read_watermarks: Callable[[], dict[str, int]], read_counts: Callable[[], dict[str, int]],
               attempts: int = 5) -> StoreSnapshot | None:
    """Counts with the watermarks they belong to: watermarks read before and after the counts
    must agree (no write in between); None if that never happened within `attempts`."""
    for _ in range(attempts):
        before = read_watermarks()
        counts = read_counts()
        if read_watermarks() == before:
            return StoreSnapshot(before, counts)
    return None


@dataclass(frozen=True)
class AuditPoint:
    """Both stores at one moment; a store that did not answer (it is down) is None."""

    param_server: list[StoreSnapshot | None] | None
    feature_store: StoreSnapshot | None


def snapshot_param_server(client: ParamClient) -> list[StoreSnapshot | None] | None:
    try:
        return [consistent(lambda s=shard: client.watermarks()[s], lambda s=shard: client.item_event_counts()[s])
                for shard in range(client.num_shards)]
    except (OSError, RuntimeError):  # a shard is down (ConnectionError) or refused (ParamServerError)
        return None


def snapshot_feature_store(store: FeatureStore) -> StoreSnapshot | None:
    try:
        return consistent(store.watermarks, store.item_event_counts)
    except (redis.RedisError, OSError):
        return None


@dataclass(frozen=True)
class TopicIndex:
    """Where each produced event landed: its partition key, offset and item (read back from the
    topic once the run is over), so the events below any watermark can be counted."""

    pkeys: np.ndarray  # object
    offsets: np.ndarray  # int64
    items: np.ndarray  # object

    @classmethod
    def read(cls, settings: Settings) -> TopicIndex:
        schema = EventSchema.from_settings(settings)
        records = read_records(settings.kafka_bootstrap, settings.topic, settings.kafka_client)
        return cls(np.array([offset_key(r.topic, r.partition) for r in records], dtype=object),
                   np.array([r.offset for r in records], dtype=np.int64),
                   np.array([schema.decode(r.value)["item_id"] for r in records], dtype=object))

    def below(self, watermarks: Counts) -> pd.Series:
        """Events per item at offsets below each partition's watermark (none where it has none)."""
        limits = pd.Series(watermarks, dtype=np.int64).reindex(self.pkeys, fill_value=0).to_numpy()
        return item_counts(self.items[self.offsets < limits])


def audit_point(point: AuditPoint, index: TopicIndex) -> dict[str, CountDiff | None]:
    """Mismatch of each store at a snapshot against what its watermarks say it holds."""
    shards = point.param_server
    ps: CountDiff | None = None
    if shards is not None and all(s is not None for s in shards):
        ps = sum((compare_counts(index.below(s.watermarks), s.counts) for s in shards), NO_DIFFERENCE)
    fs = point.feature_store
    return {"param_server": ps,
            "feature_store": None if fs is None else compare_counts(index.below(fs.watermarks), fs.counts)}
