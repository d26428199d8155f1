"""The processes of one chaos run, and the faults done to them.

A run owns everything it starts: its own Redis on a free port with no persistence (a restart comes
back empty, as Redis on this machine does), parameter-server shards that checkpoint every second,
the trainers of one consumer group, and a multi-worker `streamrec serve`. Only the broker is
shared (it comes from the settings). Each fault method returns once the fault has been done and
the component was started again; what happens next (the recovery) is measured by the caller.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from streamrec.app.infra import Started, start_redis, stop
from streamrec.app.processes import (
    STREAMREC,
    Processes,
    pipeline_env,
    start_param_server,
    worker_pids,
)
from streamrec.core import net
from streamrec.core.config import Settings
from streamrec.core.progress import stderr_console
from streamrec.stream.topics import create_topics


@dataclass(frozen=True)
class ClusterShape:
    trainers: int = 2
    shards: int = 1
    serving_workers: int = 2
    checkpoint_every: float = 1.0
    poll_interval: float = 1.0


@dataclass
class ServingRecovery:
    victim: int
    replaced_by: list[int]
    serve_restarted: bool  # uvicorn did not replace the worker: the whole serve process was restarted
    recovery_seconds: float | None  # kill -> the replacement answered /readyz with a model loaded


@dataclass
class Cluster:
    settings: Settings
    out: Path
    shape: ClusterShape
    processes: Processes = field(init=False)
    redis: Started | None = None
    shard_ports: list[int] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)  # one per trainer incarnation
    serving_url: str = ""
    revived: int = 0  # trainers that exited by themselves and were started again

    def __post_init__(self) -> None:
        self.processes = Processes(self.out)

    # ---- start and stop ---------------------------------------------------------------------
    def start(self) -> Settings:
        """Start everything; returns the run's settings (Redis and parameter-server addresses)."""
        self.redis = start_redis(self.out)
        self.settings = self.settings.model_copy(update={"redis_url": f"redis://{self.redis.host}:{self.redis.port}/0",
                                                         "redis_cluster": False})  # its own single Redis
        addresses = [self._start_shard(shard, port=0)["address"] for shard in range(self.shape.shards)]
        self.shard_ports = [int(address.rpartition(":")[2]) for address in addresses]
        self.settings = self.settings.model_copy(update={"param_servers": addresses})
        create_topics(self.settings.kafka_bootstrap, [self.settings.topic, self.settings.dlq_topic],
                      self.settings.topic_partitions)
        for slot in range(self.shape.trainers):
            self.start_trainer(slot)
        self.start_serving()
        self.wait_serving_up(time.monotonic() + 120)
        return self.settings

    def stop(self) -> None:
        """SIGTERM every process (trainers write their final report), then Redis."""
        try:
            self.processes.stop_all()
        finally:
            if self.redis is not None:
                stop(self.redis.to_json())

    @property
    def env(self) -> dict[str, str]:
        return pipeline_env(self.settings)

    def checkpoint_dir(self, shard: int) -> Path:
        return self.out / f"checkpoints-{shard}"

    def _start_shard(self, shard: int, port: int) -> dict[str, Any]:
        return start_param_server(self.processes, f"param-server-{shard}", self.env, [
            "--port", str(port), "--shard", str(shard), "--num-shards", str(self.shape.shards),
            "--checkpoint-dir", str(self.checkpoint_dir(shard)), "--checkpoint-every", str(self.shape.checkpoint_every),
        ])

    def start_trainer(self, slot: int) -> None:
        report = self.out / f"trainer-{slot}.{len(self.reports)}.json"
        self.reports.append(report)
        self.processes.start(f"trainer-{slot}", [STREAMREC, "train-online", "--report", str(report)], self.env)

    def start_serving(self) -> None:
        port = net.free_port()
        self.serving_url = f"http://127.0.0.1:{port}"
        self.processes.start("serving", [STREAMREC, "serve", "--workers", str(self.shape.serving_workers),
                                         "--port", str(port), "--poll-interval", str(self.shape.poll_interval)], self.env)

    def revive_trainers(self) -> None:
        """A trainer that exited by itself is started again, as an orchestrator would, and counted
        (its log says why); any other process that died fails the run with its log."""
        for name, proc in list(self.processes.children.items()):
            if proc.poll() is None:
                continue
            if not name.startswith("trainer-"):
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.processes.log_tail(name)}")
            stderr_console.print(f"[red]{name} exited by itself ({proc.returncode}); starting it again[/]")
            self.start_trainer(int(name.rpartition("-")[2]))
            self.revived += 1

    def wait_serving_up(self, deadline: float) -> None:
        """Until every worker exists and serving answers /healthz (workers take seconds to import)."""
        while time.monotonic() < deadline:
            try:
                if (len(self.serving_workers()) == self.shape.serving_workers
                        and httpx.get(f"{self.serving_url}/healthz", timeout=1.0).status_code == 200):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"serving did not come up:\n{self.processes.log_tail('serving')}")

    # ---- faults -----------------------------------------------------------------------------
    def kill_trainer(self, slot: int) -> None:
        """SIGKILL a trainer and start a new one in its place, as an orchestrator would."""
        self.processes.kill(f"trainer-{slot}")
        self.start_trainer(slot)

    def kill_shard(self, shard: int, wipe: bool) -> None:
        """SIGKILL a shard; with `wipe` its checkpoints are deleted too (a lost disk)."""
        self.processes.kill(f"param-server-{shard}")
        if wipe:
            shutil.rmtree(self.checkpoint_dir(shard), ignore_errors=True)

    def restart_shard(self, shard: int) -> dict[str, Any]:
        """Start the shard again on its port; returns what it printed (the checkpoint it restored)."""
        return self._start_shard(shard, self.shard_ports[shard])

    def stop_redis(self) -> None:
        stop(self.redis.to_json())

    def start_redis_again(self) -> None:
        """Redis again on the same port, empty (the run's Redis keeps nothing on disk)."""
        self.redis = start_redis(self.out, self.redis.port)

    def serving_workers(self) -> list[int]:
        return worker_pids(self.processes.children["serving"].pid)

    def kill_serving_worker(self, target: int, replace_within_s: float = 10.0,
                            ready_within_s: float = 20.0) -> tuple[float, ServingRecovery]:
        """SIGKILL one worker; wait for uvicorn to start a replacement (else restart `serve`) and
        for the replacement to answer with a model. Returns (time of the kill, the recovery)."""
        before = self.serving_workers()
        if not before:
            raise RuntimeError(f"no serving workers found under pid {self.processes.children['serving'].pid}")
        victim = before[target % len(before)]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        replacements = self._wait_for_new_workers(set(before), killed_at + replace_within_s)
        restarted = not replacements
        if restarted:
            self.processes.kill("serving")
            self.start_serving()
            replacements = self._wait_for_new_workers(set(before), time.monotonic() + replace_within_s)
        ready_at = self._wait_ready(set(replacements), time.monotonic() + ready_within_s)
        return killed_at, ServingRecovery(victim, replacements, restarted,
                                          None if ready_at is None else round(ready_at - killed_at, 3))

    def _wait_for_new_workers(self, old: set[int], deadline: float) -> list[int]:
        while time.monotonic() < deadline:
            new = [pid for pid in self.serving_workers() if pid not in old]
            if new:
                return new
            time.sleep(0.05)
        return []

    def _wait_ready(self, pids: set[int], deadline: float, every: bool = False) -> float | None:
        """Poll /readyz on fresh connections (each may land on any worker) until one of `pids`
        (with `every`, each of them) has answered ready; the time it did."""
        waiting = set(pids)
        while waiting and time.monotonic() < deadline:
            try:
                reply = httpx.get(f"{self.serving_url}/readyz", timeout=1.0)
                if reply.status_code == 200 and reply.json().get("pid") in waiting:
                    waiting = waiting - {reply.json()["pid"]} if every else set()
                    if not waiting:
                        return time.monotonic()
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        return None

    def wait_every_worker_ready(self, within_s: float = 30.0) -> float | None:
        """The time every serving worker had answered /readyz with a model loaded (None: not within
        `within_s`): until then a request may land on a worker still without one (warm-up)."""
        return self._wait_ready(set(self.serving_workers()), time.monotonic() + within_s, every=True)
