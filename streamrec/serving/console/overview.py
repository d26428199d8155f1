"""GET /ui/api/overview: one round of scrapes of every process of the pipeline, as chart figures.

Serving's own registry is read in-process; the other processes (`config.metrics_sources`, name ->
/metrics URL) are fetched concurrently. Whatever one of them does, it shows as down with the
reason and the rest of the overview answers:
- a URL that cannot be fetched at all (a typo in STREAMREC_METRICS_SOURCES: `httpx.InvalidURL`
  used to escape and make every overview a 500) is found when the sources are read, logged once,
  and never fetched;
- each fetch has one deadline, `TIMEOUT_S`, for connecting, the head and the whole body (httpx's
  timeout is per read: a source that sent a line every half second held the overview, and every
  overview request queued behind it, for ever), and its body is read in chunks up to
  `MAX_BODY_BYTES` (it used to be read whole, however large);
- an answer that does not parse is refused whole (`figures.Totals.parse`).
Parsing runs in the thread pool, not on the event loop. Each worker keeps the last `HISTORY`
samples, so a page that opens late still draws a chart at once; pages polling together share one
scrape per `MIN_INTERVAL_S` (so a scrape costs the requests queued behind it at most ~`TIMEOUT_S`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool

from streamrec.serving.console.figures import Reading, Totals, figures

log = logging.getLogger(__name__)
TIMEOUT_S = 1.0  # one source's whole fetch: connect, head and body
MAX_BODY_BYTES = 4 << 20  # a process's /metrics is tens of KiB; far more is not a metrics answer
MIN_INTERVAL_S = 0.5
HISTORY = 300
OWN = "serving"
SCHEMES = ("http", "https")


class BodyTooLarge(Exception):
    """A source answered more than MAX_BODY_BYTES."""


def url_problem(url: str) -> str | None:
    """Why `url` can never be fetched, None when it can be. The sources come from the settings
    (`streamrec.core.config`), which checks only their name=url form."""
    try:
        parsed = httpx.Request("GET", url).url  # what the fetch would build
        host = parsed.host  # IDNA-decoded here: a malformed label raises UnicodeError
    except (httpx.InvalidURL, UnicodeError) as exc:
        return f"invalid URL {url!r}: {exc}"
    if parsed.scheme not in SCHEMES:
        return f"invalid URL {url!r}: the scheme must be http or https"
    if not host:
        return f"invalid URL {url!r}: no host"
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _read_capped(client: httpx.AsyncClient, url: str) -> bytes:
    """The body of a 2xx answer; BodyTooLarge as soon as it passes MAX_BODY_BYTES (decoded)."""
    async with client.stream("GET", url) as reply:
        reply.raise_for_status()
        declared = reply.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BodyTooLarge(f"the answer declares {declared} bytes, over the {MAX_BODY_BYTES}-byte cap")
        body = bytearray()
        async for chunk in reply.aiter_bytes():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise BodyTooLarge(f"the answer passed the {MAX_BODY_BYTES}-byte cap")
        return bytes(body)


def _parse(body: bytes) -> Totals:
    """ValueError on a body that is not UTF-8 exposition text."""
    return Totals.parse(body.decode("utf-8"))


class Overview:
    def __init__(self, sources: dict[str, str], own_metrics: Callable[[], bytes],
                 own_staleness: Callable[[], float | None]) -> None:
        self.sources, self.own_metrics, self.own_staleness = dict(sources), own_metrics, own_staleness
        self.invalid = {name: problem for name, url in self.sources.items() if (problem := url_problem(url))}
        for name, problem in self.invalid.items():
            log.error("console: metrics source %s is never fetched, it shows as down: %s", name, problem)
        self.samples: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._readings: dict[str, Reading] = {}  # each process's newest reading: the base of its rates
        self._taken_at = 0.0
        self._lock = asyncio.Lock()

    async def _fetch(self, client: httpx.AsyncClient, name: str, url: str) -> tuple[bytes | None, str | None]:
        """(body or None, why not or None), within TIMEOUT_S in all."""
        problem = self.invalid.get(name)
        if problem is not None:
            return None, problem
        try:
            return await asyncio.wait_for(_read_capped(client, url), TIMEOUT_S), None
        except TimeoutError:
            return None, f"no whole answer within {TIMEOUT_S:g} s"
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError, BodyTooLarge) as exc:  # UnicodeError: IDNA
            return None, _describe(exc)

    def _parse_all(self, bodies: list[tuple[str, bytes | None, str | None]], at: float
                   ) -> tuple[dict[str, Reading], list[dict[str, Any]]]:
        """Each body parsed on its own: (readings of the processes that answered, a status row per process)."""
        readings, status = {}, []
        for name, body, error in bodies:
            if body is not None:
                try:
                    readings[name] = Reading(_parse(body), at)
                except ValueError as exc:  # not UTF-8, not the text format, or a bucket without le
                    error = f"unparsable metrics: {exc}"
            status.append({"name": name, "url": self.sources.get(name), "up": name in readings, "error": error})
        return readings, status

    async def _scrape(self, at: float) -> tuple[dict[str, Reading], list[dict[str, Any]]]:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            fetched = await asyncio.gather(*(self._fetch(client, n, u) for n, u in self.sources.items()))
        own = await run_in_threadpool(self.own_metrics)
        bodies = [(OWN, own, None), *((name, *result) for name, result in zip(self.sources, fetched))]
        return await run_in_threadpool(self._parse_all, bodies, at)

    def _figures(self, readings: dict[str, Reading]) -> dict[str, Any]:
        """This round's figures; each process that answered becomes the base of its next rates (one
        that did not keeps its older reading, so its rate on return covers its own interval)."""
        result = figures(readings, self._readings)
        self._readings.update(readings)
        if result["staleness_s"] is None:
            result["staleness_s"] = self.own_staleness()
        return result

    async def sample(self) -> dict[str, Any]:
        """The newest sample and this worker's history (oldest first)."""
        async with self._lock:
            now = time.time()
            if not self.samples or now - self._taken_at >= MIN_INTERVAL_S:
                readings, status = await self._scrape(now)
                self._taken_at = now
                self.samples.append({"t": round(now, 3), "sources": status, **self._figures(readings)})
            return {"now": self.samples[-1], "history": list(self.samples)}
