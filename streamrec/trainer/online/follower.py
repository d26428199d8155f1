"""A daemon thread the trainer runs beside its loop (the impressions and exploration readers):
started once, stopped by `close`, which waits a bounded time for the thread to finish."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Self


class FollowerThread(ABC):
    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @abstractmethod
    def _run(self) -> None:
        """Read until `self._stop` is set."""
