"""Small network helpers that every layer may need: is a port open, a free port, a Redis ping.

They sit on the ground floor because benchmarks and tests of several layers use them, while the
code that starts local servers (`streamrec.app.infra`) is operations code on the roof.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def port_open(host: str, port: int, timeout_s: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """`preferred` when nothing listens there, else a port the OS picks."""
    if preferred and not port_open(host, preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def host_port(address: str) -> tuple[str, int]:
    """'host:port' (first of a comma list) or a redis:// URL -> (host, port)."""
    first = address.split(",")[0].strip()
    if "://" in first:
        parsed = urlparse(first)
        return parsed.hostname or "127.0.0.1", parsed.port or 6379
    host, _, port = first.rpartition(":")
    return host or "127.0.0.1", int(port)


def redis_ping(url: str, timeout_s: float = 0.5) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def redis_cluster_node(url: str, timeout_s: float = 0.5) -> bool:
    """Whether the Redis at `url` runs in cluster mode (`INFO cluster`: cluster_enabled:1)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return int(client.info("cluster").get("cluster_enabled", 0)) == 1
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False
