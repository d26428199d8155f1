"""The small Kafka client interface streamrec is written against, with two backends.

kafka-python is the default (pure Python, always installed); confluent-kafka (librdkafka, the
`fast` extra) is several times faster. Everything above this layer sees only these types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

TopicPartition = tuple[str, int]
Offsets = dict[TopicPartition, int]  # next offset to read, as Kafka commits it
RebalanceCallback = Callable[[list[TopicPartition]], None]


@dataclass(frozen=True)
class ConsumerConfig:
    """What every backend's consumer takes. With `topics` it joins `group_id` and the group assigns
    partitions; without, call `Consumer.assign`. A small `partition_fetch_bytes` makes each poll mix
    all assigned partitions (a backlog is then read roughly in time order, not partition by
    partition)."""

    bootstrap: str
    group_id: str | None = None
    topics: Sequence[str] = ()
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    on_assign: RebalanceCallback | None = None
    on_revoke: RebalanceCallback | None = None
    partition_fetch_bytes: int = 8 * 1024 * 1024
    # longest a fetch waits at the broker for records: a quiet stream's event latency. Measured on
    # the embedded broker with a group member on 3 partitions: the clients' 500 ms default left
    # each event waiting 250 ms (median) before the consumer saw it; 50 ms gives 27 ms
    fetch_wait_ms: int = 50


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None  # None: a tombstone (a record produced with a null value)
    headers: Sequence[tuple[str, bytes]]


class KafkaError(RuntimeError):
    """A delivery or broker error that the caller must see (never swallowed by a backend)."""


class Producer(ABC):
    @abstractmethod
    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        """Queue one record; delivery errors surface in `flush`."""

    @abstractmethod
    def flush(self, timeout_s: float = 60.0) -> None:
        """Block until every queued record is acknowledged; raise KafkaError on any failure."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Consumer(ABC):
    """A group member (subscribe) or a standalone reader (assign), committing only explicitly."""

    @abstractmethod
    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        """Read these partitions directly (no group), from the beginning unless `seek` says otherwise."""

    @abstractmethod
    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]: ...

    @abstractmethod
    def commit(self, offsets: Offsets) -> None:
        """Synchronously commit next-offsets; call only after the records' work is done."""

    @abstractmethod
    def committed(self, partitions: Sequence[TopicPartition]) -> Offsets:
        """The group's committed next-offsets (partitions without a commit are omitted)."""

    @abstractmethod
    def assignment(self) -> list[TopicPartition]: ...

    @abstractmethod
    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    @abstractmethod
    def high_watermark(self, partition: TopicPartition) -> int | None:
        """End offset seen in the latest fetch response (None before any fetch)."""

    @abstractmethod
    def beginning_offsets(self, partitions: Sequence[TopicPartition]) -> Offsets:
        """The earliest offset the broker still holds per partition (retention may have removed
        older records): where a consumer that must read everything can start."""

    @abstractmethod
    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        """Stop fetching these partitions while `poll` goes on (the member stays in its group)."""

    @abstractmethod
    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        """Fetch paused partitions again, from where they stopped."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
