"""The open-loop load generator against a real HTTP server on loopback that is made slow, failing or
silent on purpose: latency counts the queueing behind a slow server from each request's scheduled
send time, errors of every kind are counted apart from the achieved rate, and every scheduled slot
is accounted for. Behaviour only: nothing here measures our own speed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import httpx
import numpy as np
import pytest

from streamrec.core import net
from streamrec.serving.loadgen import run_sync, zipf_users
from streamrec.serving.sweep import find_saturation, passes


class QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # the load opens up to ~150 connections at once: with socketserver's backlog of 5 a starved
    # accept loop let the kernel drop SYNs, and a retried connect made a rare error (CI, 1 of 150)
    request_queue_size = 512

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up (the timeout test) resets its connection: expected here."""


class TinyServer:
    """HTTP/1.1 keep-alive server. Path `/ok` answers 200, `/fail` 500, `/close` drops the
    connection without an answer, `/hang` answers after `hang_s`. With `serial_s`, answers are
    made one at a time, each taking that long: a server with a capacity of 1 / serial_s per second."""

    def __init__(self, serial_s: float = 0.0, hang_s: float = 0.0) -> None:
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/close":
                    self.close_connection = True
                    return
                if self.path == "/hang":
                    time.sleep(hang_s)
                if serial_s:
                    with lock:
                        time.sleep(serial_s)
                body = b"{}"
                self.send_response(500 if self.path == "/fail" else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def accounted(result: dict[str, object]) -> bool:
    """Every slot scheduled in the measured window ended as a success or as exactly one error."""
    return result["ok"] + result["errors"] == result["requests"]


def test_latency_counts_queueing_behind_a_slow_server() -> None:
    # capacity 50/s, offered 100/s: the queue grows by ~50 requests each second
    with TinyServer(serial_s=0.02) as server:
        result = run_sync(server.url, ["/ok"], rate=100, duration=1.0, warmup=0.5)
    assert result["offered_rps"] == 100
    assert result["achieved_rps"] < 0.75 * result["offered_rps"]
    # measured from the actual send, each request would take ~20 ms; from its scheduled time the
    # requests of the measured window waited behind 25..75 others
    assert result["p50_ms"] > 5 * 20
    assert result["p99_ms"] >= result["p50_ms"]
    assert result["errors"] == 0 and accounted(result), {k: result[k] for k in ("broken", "timeouts", "dropped",
                                                                             "error_statuses", "peak_connections")}


def test_errors_are_counted_apart_from_the_achieved_rate() -> None:
    paths = ["/ok", "/fail", "/ok", "/close"]
    with TinyServer() as server:
        result = run_sync(server.url, paths, rate=200, duration=1.0, warmup=0.2)
    requests = result["requests"]
    assert requests == 200
    assert result["error_statuses"] == {"500": result["error_status"]}
    assert result["error_status"] == pytest.approx(requests / 4, abs=2)
    assert result["broken"] == pytest.approx(requests / 4, abs=2)
    assert result["ok"] == pytest.approx(requests / 2, abs=2)
    assert result["errors"] == result["error_status"] + result["broken"] + result["timeouts"] + result["dropped"]
    assert result["achieved_rps"] <= 0.55 * result["offered_rps"]  # only the 200s count
    assert accounted(result)


def test_connection_cap_drops_slots_and_counts_them() -> None:
    # each answer takes 0.3 s, so 40/s needs ~12 connections; the cap allows 2
    with TinyServer(hang_s=0.3) as server:
        result = run_sync(server.url, ["/hang"], rate=40, duration=1.0, warmup=0.3, max_connections=2)
    assert result["peak_connections"] == 2
    assert result["dropped"] > result["requests"] / 2
    assert result["errors"] >= result["dropped"]
    assert accounted(result)


def test_requests_over_the_timeout_are_errors() -> None:
    with TinyServer(hang_s=1.0) as server:
        result = run_sync(server.url, ["/hang"], rate=20, duration=0.5, warmup=0.0, timeout=0.2)
    assert result["timeouts"] == result["requests"] == 10
    assert result["ok"] == 0 and result["achieved_rps"] == 0 and result["p99_ms"] is None


def test_zipf_users_are_seeded_and_skewed() -> None:
    first, again = zipf_users(1000, 20_000, 1.0, seed=3), zipf_users(1000, 20_000, 1.0, seed=3)
    assert np.array_equal(first, again)
    assert first.min() >= 0 and first.max() < 1000
    counts = np.sort(np.bincount(first, minlength=1000))[::-1]
    assert counts[:10].sum() > 0.3 * len(first)  # ~39% for exponent 1 over 1000 users
    assert not np.array_equal(first, zipf_users(1000, 20_000, 1.0, seed=4))


def fake_server(capacity: float) -> tuple[list[float], object]:
    offered: list[float] = []

    def measure(rate: float) -> dict[str, object]:
        offered.append(rate)
        return {"offered_rps": rate, "achieved_rps": min(rate, capacity), "errors": 0 if rate <= capacity else 3}

    return offered, measure


@pytest.mark.parametrize("capacity", [130.0, 1000.0, 2700.0, 9000.0])
def test_sweep_brackets_the_saturation_rate(capacity: float) -> None:
    offered, measure = fake_server(capacity)
    best, steps = find_saturation(measure, start=250)
    assert best is not None and best["pass"] and passes(best)
    assert best["offered_rps"] <= capacity
    assert best["offered_rps"] >= capacity / 1.1  # bisection closes to within 8% of the pass
    assert [s["offered_rps"] for s in steps] == offered
    assert all(s["pass"] == (s["offered_rps"] <= capacity) for s in steps)


def test_sweep_reports_none_when_nothing_passes() -> None:
    _, measure = fake_server(1.0)
    best, steps = find_saturation(measure, start=250, floor=10)
    assert best is None and steps and not any(s["pass"] for s in steps)


@pytest.fixture
def empty_stack() -> Iterator[str]:
    port = net.free_port(None, "127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "streamrec.serving.empty", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not net.port_open("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, "empty endpoint did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_empty_endpoint_stack_answers_the_generator(empty_stack: str) -> None:
    assert httpx.get(empty_stack + "/empty").json() == {}
    assert httpx.get(empty_stack + "/readyz").json()["pid"] > 0
    result = run_sync(empty_stack, ["/empty"], rate=100, duration=0.5, warmup=0.2)
    assert result["ok"] == result["requests"] == 50 and result["errors"] == 0
