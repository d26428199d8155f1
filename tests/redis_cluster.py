"""A real Redis Cluster for tests: 3 masters and 3 replicas from Debian's `redis-server` in cluster
mode on free loopback ports, joined with `redis-cli --cluster create`, nothing kept on disk.

It can fail a master over by hand (`CLUSTER FAILOVER` on its replica) or by a SIGKILL (the replica
is elected after the node timeout), and says when the cluster is whole again.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from streamrec.core import net

NODE_TIMEOUT_MS = 1000  # how long a silent master has before its replica takes over
BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000, so ports stop at 55535


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_node_port() -> int:
    """A free port whose cluster bus port is free too."""
    for _ in range(1000):
        port = net.free_port()
        if port + BUS_OFFSET <= 65535 and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


@dataclass
class RedisCluster:
    home: Path
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = NODE_TIMEOUT_MS
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)  # port -> process

    def start(self) -> RedisCluster:
        """Start and join the nodes; a start that fails stops the nodes it started."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> RedisCluster:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:  # .ci/run installs both; a developer without them is told how
            raise RuntimeError("redis-server and redis-cli are needed (apt install redis-server redis-tools)")
        taken: set[int] = set()
        for _ in range(self.masters * (1 + self.replicas)):
            port = free_node_port()
            # the nodes given earlier ports have not bound them (or their bus ports) yet: one node's
            # port 49291 and another's bus port 39291 + 10000 collided, and that node never started
            while {port, port + BUS_OFFSET} & taken:
                port = free_node_port()
            taken |= {port, port + BUS_OFFSET}
            directory = self.home / str(port)
            directory.mkdir(parents=True)
            self.nodes[port] = subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(self.node_timeout_ms),
                 # a replica takes over however long ago it last heard from its master: with a 1 s node
                 # timeout, the default factor (10) let a loaded machine's replica refuse ("disconnected
                 # from master for longer than allowed") and the cluster stayed down
                 "--cluster-replica-validity-factor", "0",
                 "--dir", str(directory), "--save", "", "--appendonly", "no", "--logfile", str(directory / "log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.nodes:
            self._wait(lambda port=port: self._client(port).ping(), f"node {port} did not start")
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60)
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}{created.stderr[-2000:]}")
        self.wait_whole()
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{next(iter(self.alive()))}/0"

    def alive(self) -> list[int]:
        return [port for port, proc in self.nodes.items() if proc.poll() is None]

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2.0, socket_connect_timeout=2.0)

    def _wait(self, predicate, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise TimeoutError(what)

    def roles(self) -> dict[int, str]:
        """Port -> 'master' or 'slave', as each live node says of itself."""
        return {port: self._client(port).execute_command("ROLE")[0].decode() for port in self.alive()}

    def master_ports(self) -> list[int]:
        return sorted(port for port, role in self.roles().items() if role == "master")

    def replica_of(self, master: int) -> int:
        for port in self.alive():
            role = self._client(port).execute_command("ROLE")
            if role[0] == b"slave" and int(role[2]) == master:
                return port
        raise LookupError(f"no replica of {master}")

    def wait_whole(self, masters: int | None = None) -> None:
        """Until every live node sees the cluster OK with `masters` masters (all slots served)."""
        want = self.masters if masters is None else masters

        def whole() -> bool:
            return all(self._client(port).cluster("info")["cluster_state"] == "ok" for port in self.alive()) \
                and len(self.master_ports()) == want
        self._wait(whole, "the cluster did not become whole")

    def online_replicas(self, master: int) -> list[int]:
        """The ports of the replicas the master counts as online (its `ROLE`)."""
        return [int(port) for _, port, _ in self._client(master).execute_command("ROLE")[2]]

    def flags(self, viewer: int, node: int) -> list[str]:
        """The flags of `node` in the `CLUSTER NODES` of `viewer` (`master`, `slave`, `fail`, ...)."""
        lines = self._client(viewer).execute_command("CLUSTER", "NODES").decode().splitlines()
        return next(line.split()[2].split(",") for line in lines if f":{node}@" in line.split()[1])

    def manual_failover(self, master: int, wait: bool = True) -> int:
        """`CLUSTER FAILOVER` on the master's replica (no write is lost); returns the new master
        (with `wait`, once it has taken over)."""
        replica = self.replica_of(master)
        self._client(replica).execute_command("CLUSTER", "FAILOVER")
        if wait:
            self._wait(lambda: self.roles().get(replica) == "master", f"{replica} did not take over from {master}")
            self.wait_whole()
        return replica

    def kill(self, port: int, wait: bool = True) -> None:
        """SIGKILL a node; with a master, its replica is elected once the node timeout has passed
        (with `wait`, this returns once it has)."""
        self.nodes[port].send_signal(signal.SIGKILL)
        self.nodes[port].wait()
        if wait:
            self.wait_whole()

    def start_again(self, ports: list[int]) -> None:
        """Start killed nodes again on their ports and directories (their nodes.conf keeps the
        cluster's layout; nothing is saved, so they come back empty) and wait until it is whole."""
        for port in ports:
            self.nodes[port] = subprocess.Popen(self.nodes[port].args, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
        self.wait_whole()

    def stop(self) -> None:
        for proc in self.nodes.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
