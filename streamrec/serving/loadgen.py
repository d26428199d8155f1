"""Open-loop HTTP load generator, run as its own process: `python -m streamrec.serving.loadgen`.

Requests are sent on a fixed schedule, t0 + n / rate, whatever the server does, and each latency is
measured from the request's *scheduled* send time: when the server (or this generator) falls
behind, the waiting counts, so the figures are free of coordinated omission. Connections come from
a keep-alive pool that grows on demand up to `max_connections`; a slot that finds every connection
busy at the cap is not sent and is counted as `dropped` (an error, never silently skipped).

It speaks HTTP/1.1 on raw asyncio streams (uvloop when installed): an HTTP client library costs
several times more CPU per request, and on a small machine that CPU would be taken from the
server being measured.

Prints one JSON object: offered_rps, achieved_rps (200 answers completed per second of the
measured window), p50/p99/p999/max_ms of the successful requests scheduled in the window, and
errors (non-200, broken connections, timeouts, dropped; never in achieved_rps).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import orjson

from streamrec.core.parent_watch import exit_with_parent

ZIPF_EXPONENT = 1.0  # user popularity of the request mix
IDLE_REUSE_S = 2.0  # under uvicorn's 5 s keep-alive: an older idle connection may be closing server-side
CONNECT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


def zipf_users(users: int, count: int, exponent: float, seed: int) -> np.ndarray:
    """`count` user numbers in [0, users), rank r drawn with probability ~ 1 / (r + 1)^exponent;
    ranks are mapped to users by a seeded permutation so popularity is not tied to the id order."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, users + 1, dtype=np.float64) ** exponent
    ranks = rng.choice(users, size=count, p=weights / weights.sum())
    return rng.permutation(users)[ranks]


@dataclass
class Tally:
    """What the run saw; latencies in seconds from the scheduled send time."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    completed_in_window: int = 0
    status_errors: int = 0
    broken: int = 0
    timeouts: int = 0
    dropped: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def measured(self, scheduled: float) -> bool:
        return self.start <= scheduled < self.end


class OpenLoop:
    """One run: the scheduler launches a task per slot on an idle pooled connection."""

    def __init__(self, host: str, port: int, requests: Sequence[bytes], rate: float, duration: float,
                 warmup: float, max_connections: int, timeout: float) -> None:
        self.host, self.port, self.requests, self.rate = host, port, requests, rate
        self.duration, self.warmup, self.max_connections, self.timeout = duration, warmup, max_connections, timeout
        self.idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = deque()  # last used at
        self.open = 0
        self.peak_open = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> Tally:
        total = int((self.warmup + self.duration) * self.rate)
        t0 = time.perf_counter() + 0.05
        tally = Tally(t0 + self.warmup, t0 + self.warmup + self.duration)
        n = 0
        while n < total:
            now = time.perf_counter()
            due = min(total, int((now - t0) * self.rate) + 1)
            while n < due:
                self._launch(t0 + n / self.rate, self.requests[n % len(self.requests)], tally)
                n += 1
            if n < total:
                await asyncio.sleep(max(0.0, t0 + n / self.rate - time.perf_counter()))
        if self.tasks:  # requests still out: each is bounded by `timeout`
            await asyncio.wait(set(self.tasks))
        for _, writer, _ in self.idle:
            writer.close()
        return tally

    def _take_idle(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used idle connection (few stay warm); those idle too long are closed
        first (the oldest sit at the left end)."""
        now = time.perf_counter()
        while self.idle and now - self.idle[0][2] > IDLE_REUSE_S:
            self.idle.popleft()[1].close()
            self.open -= 1
        if not self.idle:
            return None
        reader, writer, _ = self.idle.pop()
        return reader, writer

    def _launch(self, scheduled: float, request: bytes, tally: Tally) -> None:
        connection = self._take_idle()
        if connection is None:
            if self.open >= self.max_connections:
                if tally.measured(scheduled):
                    tally.dropped += 1
                return
            self.open += 1
            self.peak_open = max(self.peak_open, self.open)
        task = asyncio.get_running_loop().create_task(self._one(connection, scheduled, request, tally))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, scheduled: float,
                   request: bytes, tally: Tally) -> None:
        status = b""
        failure: str | None = None
        try:
            async with asyncio.timeout(self.timeout):
                if connection is None:
                    connection = await asyncio.open_connection(self.host, self.port)
                reader, writer = connection
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = head[9:12]
                length = _content_length(head)
                await reader.readexactly(length)
                if b"\nconnection: close" in head.lower():
                    raise ConnectionResetError("server closed the connection")
        except TimeoutError:
            failure = "timeout"
        except CONNECT_ERRORS:
            failure = "broken"
        done = time.perf_counter()
        if failure is None and connection is not None:
            self.idle.append((*connection, done))
        else:
            self.open -= 1
            if connection is not None:
                connection[1].close()
        ok = failure is None and status == b"200"
        if ok and tally.start <= done < tally.end:
            tally.completed_in_window += 1
        if not tally.measured(scheduled):
            return
        if ok:
            tally.latencies.append(done - scheduled)
        elif failure == "timeout":
            tally.timeouts += 1
        elif failure == "broken":
            tally.broken += 1
        else:
            tally.status_errors += 1
            key = status.decode(errors="replace")
            tally.statuses[key] = tally.statuses.get(key, 0) + 1


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            return int(line[15:])
    raise ValueError("no Content-Length")


def summarise(tally: Tally, rate: float, duration: float, peak_connections: int) -> dict[str, object]:
    ms = np.array(tally.latencies) * 1000
    errors = tally.status_errors + tally.broken + tally.timeouts + tally.dropped

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ms, q)), 3) if len(ms) else None

    achieved = round(tally.completed_in_window / duration, 1)
    return {
        "offered_rps": round(rate, 1), "achieved_rps": achieved, "qps": achieved,
        "requests": round(rate * duration), "ok": len(ms),
        "p50_ms": pct(50), "p99_ms": pct(99), "p999_ms": pct(99.9),
        "max_ms": round(float(ms.max()), 3) if len(ms) else None,
        "errors": errors, "error_status": tally.status_errors, "error_statuses": tally.statuses,
        "broken": tally.broken, "timeouts": tally.timeouts, "dropped": tally.dropped,
        "peak_connections": peak_connections, "duration_s": duration, "rate": rate,
    }


def build_requests(host: str, paths: Sequence[str], headers: dict[str, str]) -> list[bytes]:
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return [f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode() for path in paths]


async def run(url: str, paths: Sequence[str], rate: float, duration: float, warmup: float = 1.0,
              max_connections: int = 256, timeout: float = 5.0,
              headers: dict[str, str] | None = None) -> dict[str, object]:
    """One open-loop run at `rate` requests/s; `paths` are sent in order, cycling."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    loop = OpenLoop(host, parts.port or 80, build_requests(host, paths, headers or {}), rate, duration, warmup,
                    max_connections, timeout)
    tally = await loop.run()
    return summarise(tally, rate, duration, loop.peak_open)


def run_sync(url: str, paths: Sequence[str], rate: float, duration: float, warmup: float = 1.0,
             max_connections: int = 256, timeout: float = 5.0,
             headers: dict[str, str] | None = None) -> dict[str, object]:
    """`run` on a fresh event loop (uvloop when installed: less CPU per request on a shared machine)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run(url, paths, rate, duration, warmup, max_connections, timeout, headers))


def finite(minimum: float, above: bool) -> Callable[[str], float]:
    """An argparse type: a finite float >= `minimum` (> with `above`). `--rate nan` died in
    `int(nan)` and `--rate inf` in an OverflowError, tracebacks where a usage line belongs."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"{text!r}: a finite number {'>' if above else '>='} {minimum:g}")
        return value
    return parse


def at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://host:port")
    parser.add_argument("--template", default="/recommend?user_id=u{user}&k=10", help="path; {user} is replaced")
    parser.add_argument("--users", type=at_least_one, default=10_000)
    parser.add_argument("--zipf", type=finite(0.0, above=False), default=ZIPF_EXPONENT,
                        help="exponent of the user popularity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=finite(0.0, above=True), required=True, help="requests/s, open loop")
    parser.add_argument("--duration", type=finite(0.0, above=True), default=20.0)
    parser.add_argument("--warmup", type=finite(0.0, above=False), default=1.0)
    parser.add_argument("--max-connections", type=at_least_one, default=256)
    parser.add_argument("--timeout", type=finite(0.0, above=True), default=5.0,
                        help="seconds before a request counts as timed out")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    args = parser.parse_args(argv)
    exit_with_parent()
    count = max(1, int((args.warmup + args.duration) * args.rate))
    paths = [args.template.format(user=u) for u in zipf_users(args.users, count, args.zipf, args.seed)]
    headers = dict(h.split(":", 1) for h in args.header)
    result = run_sync(args.url, paths, args.rate, args.duration, args.warmup, args.max_connections, args.timeout,
                      {k.strip(): v.strip() for k, v in headers.items()})
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
