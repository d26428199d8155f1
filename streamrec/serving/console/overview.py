"""GET /ui/api/overview: one round of scrapes of every process of the pipeline, as chart figures.

Serving's own registry is read in-process; the other processes (`config.metrics_sources`, name ->
/metrics URL) are fetched concurrently with a short timeout, so a process that is down or hangs
costs the page at most `TIMEOUT_S` and shows as down, never as an error of the console. Each worker
keeps the last `HISTORY` samples, so a page that opens late still draws a chart at once; pages
polling together share one scrape per `MIN_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool

from streamrec.serving.console.figures import Totals, figures

TIMEOUT_S = 1.0
MIN_INTERVAL_S = 0.5
HISTORY = 300
OWN = "serving"


class Overview:
    def __init__(self, sources: dict[str, str], own_metrics: Callable[[], bytes],
                 own_staleness: Callable[[], float | None]) -> None:
        self.sources, self.own_metrics, self.own_staleness = dict(sources), own_metrics, own_staleness
        self.samples: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._totals: Totals | None = None
        self._taken_at = 0.0
        self._lock = asyncio.Lock()

    async def _fetch(self, client: httpx.AsyncClient, name: str, url: str) -> tuple[str, str | None, str | None]:
        """(name, text or None, error or None)."""
        try:
            reply = await client.get(url)
            reply.raise_for_status()
            return name, reply.text, None
        except httpx.HTTPError as exc:
            return name, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def _scrape(self) -> tuple[Totals, list[dict[str, Any]]]:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            fetched = await asyncio.gather(*(self._fetch(client, n, u) for n, u in self.sources.items()))
        own = (await run_in_threadpool(self.own_metrics)).decode()
        totals, status = Totals(), []
        for name, text, error in [(OWN, own, None), *fetched]:
            if text is not None:
                try:
                    totals.add(text)
                except ValueError as exc:  # an answer that is not the text format
                    text, error = None, f"unparsable metrics: {exc}"
            status.append({"name": name, "url": self.sources.get(name), "up": text is not None, "error": error})
        if totals.staleness is None:
            totals.staleness = self.own_staleness()
        return totals, status

    async def sample(self) -> dict[str, Any]:
        """The newest sample and this worker's history (oldest first)."""
        async with self._lock:
            now = time.time()
            if not self.samples or now - self._taken_at >= MIN_INTERVAL_S:
                totals, status = await self._scrape()
                previous, seconds = self._totals, now - self._taken_at
                self._totals, self._taken_at = totals, now
                self.samples.append({"t": round(now, 3), "sources": status, **figures(totals, previous, seconds)})
            return {"now": self.samples[-1], "history": list(self.samples)}
