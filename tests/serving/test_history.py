"""/recommend's asynchronous history read against hostile Redis peers on real sockets: a peer that
accepts and never answers costs a timeout per request only until three come in a row (the
client's timeouts run on the event loop and also count other requests' work), then Redis is
skipped for `redis_retry_s`; a peer that drops every connection is skipped at once."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from streamrec.serving.config import ServingConfig
from streamrec.serving.history import ASYNC_TIMEOUTS_TO_OPEN, History
from streamrec.serving.metrics import serving_metrics


@dataclass
class Peer:
    """A TCP server that either holds connections silently or closes each one at once, and
    counts the connections it accepted."""

    silent: bool
    sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    connections: int = 0
    held: list[socket.socket] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if not self.silent:
                conn.close()
                continue
            self.held.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket) -> None:
        """Take what the client sends (its handshake, its command) and never answer."""
        while True:
            try:
                if not conn.recv(65536):
                    return
            except OSError:
                return


def _peer(silent: bool) -> Iterator[Peer]:
    peer = Peer(silent)
    threading.Thread(target=peer.serve, daemon=True).start()
    yield peer
    peer.sock.close()
    for conn in peer.held:
        conn.close()


@pytest.fixture
def silent_peer() -> Iterator[Peer]:
    yield from _peer(silent=True)


@pytest.fixture
def closing_peer() -> Iterator[Peer]:
    yield from _peer(silent=False)


def _reads(url: str, n: int) -> list[tuple[list[str], set[str]] | None]:
    history = History(ServingConfig(redis_url=url, redis_timeout_s=0.1, redis_retry_s=60.0), serving_metrics())

    async def run() -> list[tuple[list[str], set[str]] | None]:
        try:
            return [await history.user_history_async("u:1", 10, False) for _ in range(n)]
        finally:
            await history.close()

    return asyncio.run(run())


def test_timeouts_skip_redis_only_after_several_in_a_row(silent_peer: Peer) -> None:
    results = _reads(silent_peer.url, ASYNC_TIMEOUTS_TO_OPEN + 2)
    assert results == [None] * (ASYNC_TIMEOUTS_TO_OPEN + 2)  # every request served without history
    # each of the first requests asked, on a fresh connection since a timed-out one is dropped (a
    # lone slow answer must not blind the worker for a second); from the third timeout in a row on,
    # Redis is not asked
    assert silent_peer.connections == ASYNC_TIMEOUTS_TO_OPEN


def test_a_refused_connection_skips_redis_at_once(closing_peer: Peer) -> None:
    assert _reads(closing_peer.url, 3) == [None, None, None]
    assert closing_peer.connections == 1
