"""Closed-loop HTTP load generator, run as its own process: `python -m streamrec.serving.loadgen`.

`concurrency` keep-alive connections each send a GET, wait for the whole response, and send the
next. It speaks HTTP/1.1 on raw asyncio streams: an HTTP client library costs several times more
CPU per request, and on a small machine that CPU would be taken from the workers being measured.
Prints one JSON object: requests, qps, p50_ms, p99_ms, errors (non-200 answers and broken
connections), measured after `warmup` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from urllib.parse import urlsplit

import numpy as np
import orjson


async def _client(host: str, port: int, paths: list[str], start: float, end: float,
                  latencies: list[float], errors: list[int], seed: int, interval: float) -> None:
    """One closed-loop user; with `interval` > 0 it also waits for its next slot (paced load)."""
    rng = random.Random(seed)
    reader = writer = None
    next_at = time.perf_counter() + rng.uniform(0, interval)
    while time.perf_counter() < end:
        if interval:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at = max(next_at + interval, time.perf_counter() - interval)
        if writer is None:
            reader, writer = await asyncio.open_connection(host, port)
        path = paths[rng.randrange(len(paths))]
        sent = time.perf_counter()
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            ok = head[9:12] == b"200"
        except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
            ok = False
            writer.close()
            writer = None
        if sent >= start:
            latencies.append(time.perf_counter() - sent)
            if not ok:
                errors.append(1)
    if writer is not None:
        writer.close()


async def run(url: str, paths: list[str], concurrency: int, duration: float, warmup: float,
              rate: float = 0.0) -> dict[str, float]:
    """Closed loop; `rate` > 0 paces the users to about that many requests/s in total."""
    parts = urlsplit(url)
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter() + warmup
    end = start + duration
    await asyncio.gather(*(_client(parts.hostname or "127.0.0.1", parts.port or 80, paths, start, end,
                                   latencies, errors, seed, concurrency / rate if rate else 0.0)
                           for seed in range(concurrency)))
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "qps": round(len(ms) / duration, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 3) if len(ms) else None,
            "errors": len(errors), "duration_s": duration, "rate": rate or None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://host:port")
    parser.add_argument("--template", default="/recommend?user_id=u{user}&k=10", help="path; {user} is replaced")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=0.0, help="total requests/s to pace to (0: as fast as possible)")
    args = parser.parse_args(argv)
    paths = [args.template.format(user=u) for u in range(args.users)]
    result = asyncio.run(run(args.url, paths, args.concurrency, args.duration, args.warmup, args.rate))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
