"""Users asking serving for recommendations during a pipeline run (`streamrec demo`, `streamrec chaos`).

One thread sends `/recommend` for random users of the log at a steady rate and keeps what a run
reports: latency of every answer, every failure with the interval it was in flight (so a chaos run
can tell the requests a killed worker was serving from real failures), the 503s of workers that
have no model yet, and the staleness serving reports. Times are `time.monotonic()`.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np


@dataclass(frozen=True)
class FailedRequest:
    started: float
    ended: float
    error: str
    transport: bool  # no HTTP answer at all (connection refused, reset or closed mid-request)


class Queries:
    def __init__(self, url: str, rate: float, users: np.ndarray, seed: int = 0) -> None:
        """`rate` queries per second, finite and above 0: the thread waits 1 / rate between them,
        so 0 raised ZeroDivisionError in the thread (it died without a word and the run reported
        0 queries, 0 errors) and a negative or NaN wait sent them back to back."""
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"query rate: a finite number of queries per second above 0, not {rate}")
        self.url, self.rate, self.users, self.seed = url, rate, users, seed
        self.latencies: list[tuple[float, float]] = []  # (time answered, ms)
        self.failures: list[FailedRequest] = []
        self.unavailable: list[tuple[float, str]] = []  # (time, detail) of 503 answers: no model loaded yet
        self.staleness: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="queries", daemon=True)

    @property
    def errors(self) -> int:
        return len(self.failures)

    @property
    def last_error(self) -> str | None:
        return self.failures[-1].error if self.failures else None

    def _run(self) -> None:
        rng = np.random.default_rng(self.seed)
        with httpx.Client(base_url=self.url, timeout=5.0) as http:
            while not self.stop.wait(0.2):  # the workers are starting: not an error yet
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    continue
            while not self.stop.wait(1.0 / self.rate):
                self._ask(http, str(self.users[rng.integers(len(self.users))]))

    def _ask(self, http: httpx.Client, user: str) -> None:
        started = time.monotonic()
        try:
            reply = http.get("/recommend", params={"user_id": user, "k": 10})
        except httpx.TransportError as exc:
            self.failures.append(FailedRequest(started, time.monotonic(), repr(exc), transport=True))
            return
        if reply.status_code == 503:  # no model loaded yet: not an error of the run
            self.unavailable.append((time.monotonic(), reply.text[:200]))
            return
        if reply.status_code != 200:
            self.failures.append(FailedRequest(started, time.monotonic(), f"HTTP {reply.status_code}: {reply.text[:200]}",
                                               transport=False))
            return
        self.staleness = reply.json().get("staleness_seconds")
        self.latencies.append((time.monotonic(), (time.monotonic() - started) * 1000))

    def percentile(self, q: float, last: int | None = None) -> float | None:
        values = [ms for _, ms in self.latencies[-last:]] if last else [ms for _, ms in self.latencies]
        return float(np.percentile(values, q)) if values else None
