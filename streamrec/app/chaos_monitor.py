"""What the stores show while faults strike: a sampler thread, and recovery times read from it.

Every `period` seconds the sampler asks the parameter server for its applied events and
per-partition watermarks and the feature store for its watermarks, with short timeouts and no
retries (a store that is down is a `None` sample, not a stall). Recovery times are read from the
samples afterwards:

- `first_progress`: from a fault to the first sample, once the store answers again, that shows
  more applied events than the store's first answer after the fault: the first applied batch.
- `moving_again`: from a fault to the moment every partition that still had events to learn
  advanced past where it stood at the fault (a killed trainer's partitions taken over or resumed).
- `caught_up`: from a fault to the moment every partition is back where it stood at the fault
  (a restored or rebuilt store has learned again what the fault took away).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import redis

from streamrec.param_server.client import ParamClient
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

Watermarks = dict[str, int]


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    applied: int | None  # the parameter server's applied events (None: a shard did not answer)
    param_server: Watermarks | None  # per partition: the lowest watermark over shards
    feature_store: Watermarks | None


def lowest(per_shard: list[Watermarks]) -> Watermarks:
    """Per partition the lowest watermark over shards (a partition a shard lacks counts as 0)."""
    keys = set().union(*per_shard)
    return {key: min(shard.get(key, 0) for shard in per_shard) for key in keys}


class Sampler:
    def __init__(self, param_servers: list[str], redis_url: str, feature_prefix: str, period: float = 0.25) -> None:
        self.param_servers, self.redis_url, self.feature_prefix, self.period = (
            param_servers, redis_url, feature_prefix, period)
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos-sampler", daemon=True)

    def _run(self) -> None:
        features = FeatureStore.from_url(self.redis_url, FeatureStoreConfig(prefix=self.feature_prefix), timeout_s=0.5)
        with ParamClient(self.param_servers, timeout=1.0, retries=0) as client:
            while not self.stop.wait(self.period):
                self.samples.append(self.sample(client, features))

    @staticmethod
    def sample(client: ParamClient, features: FeatureStore) -> Sample:
        at = time.monotonic()
        try:
            applied, param_server = client.applied_events(), lowest(client.watermarks())
        except (OSError, RuntimeError):  # a shard is down or restarting
            applied = param_server = None
        try:
            feature_store = features.watermarks()
        except (redis.RedisError, OSError):
            feature_store = None
        return Sample(at, applied, param_server, feature_store)

    def last_before(self, at: float) -> Sample | None:
        earlier = [s for s in self.samples if s.at <= at]
        return earlier[-1] if earlier else None


def first_progress(samples: list[Sample], fault_at: float) -> float | None:
    baseline = None
    for s in samples:
        if s.at < fault_at or s.applied is None:
            continue
        if baseline is None:
            baseline = s.applied
        elif s.applied > baseline:
            return s.at - fault_at
    return None


def _marks(sample: Sample, store: str) -> Watermarks | None:
    return sample.param_server if store == "param_server" else sample.feature_store


def moving_again(samples: list[Sample], fault_at: float, store: str = "param_server") -> float | None:
    before = [s for s in samples if s.at <= fault_at and _marks(s, store) is not None]
    after = [s for s in samples if s.at > fault_at and _marks(s, store) is not None]
    if not before or not after:
        return None
    start, end = _marks(before[-1], store), _marks(after[-1], store)
    moving = [key for key, mark in end.items() if mark > start.get(key, 0)]
    if not moving:  # nothing was left to learn after the fault: nothing to time
        return None
    for s in after:
        marks = _marks(s, store)
        if all(marks.get(key, 0) > start.get(key, 0) for key in moving):
            return s.at - fault_at
    return None


def caught_up(samples: list[Sample], fault_at: float, store: str) -> float | None:
    before = [s for s in samples if s.at <= fault_at and _marks(s, store) is not None]
    if not before:
        return None
    start = _marks(before[-1], store)
    for s in samples:
        marks = _marks(s, store)
        if s.at > fault_at and marks is not None and all(marks.get(key, 0) >= mark for key, mark in start.items()):
            return s.at - fault_at
    return None
