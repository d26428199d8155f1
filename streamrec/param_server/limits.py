"""What one parameter-server shard lets its peers use: frame caps, a byte budget, connection counts
and deadlines, and the bookkeeping of open connections that enforces the counts.

Why separate counts: a connection is unauthenticated until its first frame (hello + token) checks
out, and those count toward a small limit of their own, so a flood of idle or hostile connections
can never take the slots of clients that hold the token.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

from streamrec.param_server.defaults import (
    DEFAULT_AUTH_TIMEOUT,
    DEFAULT_BUDGET_WAIT,
    DEFAULT_BYTE_BUDGET,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_UNAUTHENTICATED,
)
from streamrec.param_server.protocol import FrameLimits, FramePace


@dataclass(frozen=True)
class ServerLimits:
    frames: FrameLimits = field(default_factory=FrameLimits)
    byte_budget: int = DEFAULT_BYTE_BUDGET
    budget_wait: float = DEFAULT_BUDGET_WAIT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED
    auth_timeout: float = DEFAULT_AUTH_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    pace: FramePace = field(default_factory=FramePace)  # how fast a frame's bytes must follow its prefix

    def __post_init__(self) -> None:
        if min(self.frames.max_header, self.frames.max_body, self.byte_budget, self.max_connections, self.max_unauthenticated) < 1:
            raise ValueError("frame caps, byte budget and connection limits must be positive")
        if min(self.auth_timeout, self.idle_timeout, self.budget_wait) <= 0:
            raise ValueError("timeouts must be positive")


class ConnectionGate:
    """Open connections, counted as unauthenticated until `promote`; `close_all` shuts every one
    down so that threads blocked reading them return at once (used on SIGTERM)."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._open: dict[socket.socket, bool] = {}  # socket -> authenticated
        self._closing = False

    def counts(self) -> tuple[int, int]:
        """(authenticated, unauthenticated) connections now open."""
        with self._lock:
            authenticated = sum(self._open.values())
            return authenticated, len(self._open) - authenticated

    def admit(self, sock: socket.socket) -> bool:
        """Take an unauthenticated slot for a new connection (False: closing, refuse it). With
        every slot taken, the oldest connection still to say hello is shut down for it, so idle
        connections only push each other out: refusing the newcomer instead let a burst of idle
        sockets waiting in the listen backlog lock out a client that says hello at once."""
        with self._lock:
            if self._closing:
                return False
            waiting = [other for other, authenticated in self._open.items() if not authenticated]
            if len(waiting) >= self.limits.max_unauthenticated:
                oldest = waiting[0]  # dicts keep insertion order: the longest waiting
                del self._open[oldest]
                try:  # its handler thread's read returns at once and ends the connection
                    oldest.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed by its peer or its handler
                    pass
            self._open[sock] = False
            return True

    def promote(self, sock: socket.socket) -> bool:
        """Move an admitted connection to the authenticated count; False when those are all taken."""
        with self._lock:
            if self._closing or sum(self._open.values()) >= self.limits.max_connections:
                return False
            self._open[sock] = True
            return True

    def leave(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.pop(sock, None)

    def close_all(self) -> None:
        with self._lock:
            self._closing = True
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by its peer
                pass
