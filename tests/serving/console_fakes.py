"""Real pieces for the console's fault tests: /metrics sources served over HTTP on loopback whose
answers a test sets per path (good text, text that breaks half-way, a body that trickles for ever,
one larger than any metrics answer, an error status), and a parameter server holding a small model
whose ids include the awkward ones ("valueOf", "__proto__", ".", "..")."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from streamrec.param_server.client import ParamClient
from tests.param_server.conftest import ServerProcess
from tests.serving.conftest import load_model, start_param_server

Answer = Callable[[BaseHTTPRequestHandler, threading.Event], None]
AWKWARD_IDS = ["valueOf", "hasOwnProperty", "isPrototypeOf", "toString", "constructor", "__proto__", ".", ".."]
ITEMS = [f"i{n:03d}" for n in range(60)] + AWKWARD_IDS
USERS = ["u1", "u2", ".", ".."]
DIM = 8


def text(body: str, status: int = 200, content_type: str = "text/plain; version=0.0.4") -> Answer:
    """A whole answer with its Content-Length."""
    data = body.encode()

    def answer(handler: BaseHTTPRequestHandler, closing: threading.Event) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return answer


def trickle(line: bytes = b"# still here\n", every_s: float = 0.2) -> Answer:
    """Valid text, one line every `every_s`, until the client goes away or the sources close:
    each read is quick, the answer never ends."""

    def answer(handler: BaseHTTPRequestHandler, closing: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.end_headers()
        while not closing.wait(every_s):
            handler.wfile.write(line)
            handler.wfile.flush()

    return answer


def flood(total_bytes: int) -> Answer:
    """`total_bytes` of comment lines (valid text) without a Content-Length, ended by closing."""

    def answer(handler: BaseHTTPRequestHandler, closing: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.end_headers()
        line = b"#" + b"x" * 1022 + b"\n"
        for _ in range(total_bytes // len(line) + 1):
            if closing.is_set():
                return
            handler.wfile.write(line)

    return answer


class FakeSources:
    """An HTTP server on 127.0.0.1 answering GET PATH with `answers[PATH]` (404 for others)."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.closing = threading.Event()
        sources = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the connection closes

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                answer = sources.answers.get(self.path) or text("not found\n", 404)
                try:
                    answer(self, sources.closing)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the scraper gave up on this answer: what the tests provoke

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-metrics", daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def fake_sources(answers: dict[str, Answer]) -> Iterator[FakeSources]:
    sources = FakeSources()
    sources.answers.update(answers)
    try:
        yield sources
    finally:
        sources.close()


def sources_env(sources: dict[str, str]) -> dict[str, str]:
    """STREAMREC_METRICS_SOURCES in its name=url,name=url form."""
    return {"STREAMREC_METRICS_SOURCES": ",".join(f"{name}={url}" for name, url in sources.items())}


@contextmanager
def model_server(home: Path) -> Iterator[ServerProcess]:
    """A parameter server with vectors for USERS and ITEMS (the BPR tables serving reads)."""
    server = start_param_server(home)
    rng = np.random.default_rng(7)
    try:
        with ParamClient([server.address]) as client:
            load_model(client, {u: rng.normal(size=DIM).astype(np.float32) for u in USERS},
                       {i: rng.normal(size=DIM).astype(np.float32) for i in ITEMS})
        yield server
    finally:
        server.kill()


def add_item(server: ServerProcess, item: str, seed: int = 0) -> None:
    """One more item vector (serving's next poll swaps a new state in)."""
    rng = np.random.default_rng(seed)
    with ParamClient([server.address]) as client:
        client.assign("bpr_items", [item], rng.normal(size=(1, DIM)).astype(np.float32), np.zeros(1, np.float32))
