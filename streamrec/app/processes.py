"""Child processes of a whole-pipeline run (`streamrec demo`, `streamrec chaos`).

One place for what both need: the environment that points a `streamrec` subprocess at a run's
settings, starting a process with its log under the run's directory, starting a parameter-server
shard and reading the address it prints, killing and restarting one process by name, and stopping
everything on the way out (SIGTERM, then SIGKILL), so a run never leaves processes behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from streamrec.core.children import stop_children
from streamrec.core.config import Settings
from streamrec.core.parent_watch import watched_env

STREAMREC = str(Path(sys.executable).parent / "streamrec")


def pipeline_env(settings: Settings) -> dict[str, str]:
    """This process's environment plus the STREAMREC_* variables that make a subprocess use
    `settings` (broker, topic, group and its session timing, Redis, parameter servers)."""
    return {
        **os.environ,
        "STREAMREC_HOME": str(settings.home),
        "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMREC_KAFKA_CLIENT": settings.kafka_client,
        "STREAMREC_TOPIC": settings.topic,
        "STREAMREC_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "STREAMREC_CONSUMER_GROUP": settings.consumer_group,
        "STREAMREC_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
        "STREAMREC_HEARTBEAT_INTERVAL_MS": str(settings.heartbeat_interval_ms),
        "STREAMREC_FETCH_WAIT_MS": str(settings.fetch_wait_ms),
        "STREAMREC_REDIS_URL": settings.redis_url,
        "STREAMREC_REDIS_CLUSTER": "true" if settings.redis_cluster else "false",
        "STREAMREC_FEATURE_PREFIX": settings.feature_prefix,
        "STREAMREC_PARAM_SERVERS": ",".join(settings.param_servers),
    }


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file another process rewrites atomically (a trainer report); None until it exists."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class Processes:
    """Named child processes, each logging (stdout and stderr, appended across restarts) to
    `<logs>/<name>.log`. A name holds its current process; starting a name again replaces it."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: dict[str, subprocess.Popen] = {}

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str, args: list[str], env: dict[str, str], read_stdout: bool = False) -> subprocess.Popen:
        """Start `args` as `name`; with `read_stdout` the caller reads the process's stdout. The
        child ends with this process, even one SIGKILLed (`streamrec.core.parent_watch`)."""
        current = self.children.get(name)
        if current is not None and current.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {current.pid})")
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(args, env=watched_env(env),
                                    stdout=subprocess.PIPE if read_stdout else log, stderr=log, stdin=subprocess.DEVNULL)
        self.children[name] = proc
        return proc

    def check(self) -> None:
        """Raise if a process exited on its own (a crash the run did not cause)."""
        for name, proc in self.children.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_path(name)}")

    def kill(self, name: str) -> int:
        """SIGKILL `name` (no chance to clean up, like a crash) and reap it; returns its pid."""
        proc = self.children[name]
        proc.kill()
        proc.wait()
        return proc.pid

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM everything, newest first, then SIGKILL what has not exited after 15 s."""
        stop_children(reversed(self.children.values()), grace_s=15.0)


def start_param_server(processes: Processes, name: str, env: dict[str, str], args: list[str]) -> dict[str, Any]:
    """Start one parameter-server shard (`args`: its `param-server` options) and wait until it
    listens; returns the JSON line it prints then ({"address": ..., "restored": ...})."""
    proc = processes.start(name, [sys.executable, "-m", "streamrec.param_server", *args], env, read_stdout=True)
    line = proc.stdout.readline()
    try:
        return json.loads(line)
    except ValueError:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{name} did not start; log:\n{processes.log_tail(name)}") from None


def worker_pids(parent: int) -> list[int]:
    """The worker processes of a multi-worker `streamrec serve`: uvicorn spawns each through
    multiprocessing's `spawn_main` (its other helper children are not workers). Read from /proc
    (Linux), where the kernel lists every thread's children."""
    pids: set[int] = set()
    for children in Path(f"/proc/{parent}/task").glob("*/children"):
        try:
            pids.update(int(pid) for pid in children.read_text().split())
        except OSError:  # the parent or a thread exited meanwhile
            continue
    workers = []
    for pid in pids:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
        except OSError:
            continue
    return sorted(workers)
