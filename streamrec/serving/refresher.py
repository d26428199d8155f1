"""A worker's background reader of something the trainer keeps in Redis (the exploration pool,
the context slices): re-read every `interval_s` on a daemon thread of its own, so a request never
waits for Redis for it; while Redis is down, or a read fails for any other reason (data it cannot
parse, a bug), the last read stays in use, the thread goes on re-reading, and the failure is logged
once, not at every attempt."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Self

import redis

log = logging.getLogger(__name__)


class Refresher(ABC):
    def __init__(self, name: str, interval_s: float) -> None:
        self.name, self.interval_s = name, interval_s
        self.reads = 0  # successful reads (a barrier in tests and the simulator)
        self.failures = 0  # reads that failed, whatever the error
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"serving-{name}", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        self._read()
        self.reads += 1

    @abstractmethod
    def _read(self) -> None:
        """Read from Redis and publish the result (one attribute assignment: readers never lock)."""

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                if self._failing:
                    log.warning("%s refreshed again", self.name)
                self._failing = False
            except redis.RedisError as exc:
                if not self._failing:
                    log.warning("%s not refreshed (%s): the last read stays in use until Redis answers", self.name,
                                exc)
                self._failed()
            except Exception:  # bad data or a bug in one read must not end the thread: nothing else re-reads
                if not self._failing:
                    log.exception("%s not refreshed: the last read stays in use until a read succeeds", self.name)
                self._failed()
            self._stop.wait(self.interval_s)

    def _failed(self) -> None:
        """Note a failed read: counted for whoever watches, logged again only once a read succeeds."""
        self.failures += 1
        self._failing = True
