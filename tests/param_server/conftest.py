"""Real server processes on free loopback ports, stopped with SIGTERM like in production."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamrec.core.parent_watch import watched_env
from streamrec.param_server.client import ParamClient
from tests import children


class ServerProcess:
    BUSY_PORT_TRIES = 20  # a restart on the same port: half a second apart

    def __init__(self, args: list[str], env: dict[str, str]):
        """The server on a free port, or on `--port P` given in `args`. A test restarting a shard
        on its old port can find that number taken for a moment by another process's outgoing
        connection (its local port is drawn from the same ephemeral range): the start is tried
        again then, as an operator would, instead of failing the test."""
        for attempt in range(self.BUSY_PORT_TRIES):
            self.proc = children.track(subprocess.Popen(
                [sys.executable, "-m", "streamrec.param_server", "--port", "0", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=watched_env(env),  # ends with this test process, even one killed
            ))
            line = self.proc.stdout.readline()
            if line:
                break
            error = self.proc.stderr.read()
            self.proc.wait()
            if "Address already in use" not in error or attempt == self.BUSY_PORT_TRIES - 1:
                raise RuntimeError(f"server did not start: {error}")
            time.sleep(0.5)
        self.ready = json.loads(line)
        self.address: str = self.ready["address"]

    def stop(self) -> str:
        """SIGTERM (final checkpoint) and wait; returns the server's stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        assert self.proc.returncode == 0, err
        return err

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate()


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """start_server(*cli_args, token=None) -> ServerProcess; all are stopped at the end."""
    started: list[ServerProcess] = []

    def start(*args: str, token: str | None = None) -> ServerProcess:
        env = {**os.environ, "STREAMREC_HOME": str(tmp_path / "home")}
        env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
        if token:
            env["STREAMREC_PARAM_SERVER_TOKEN"] = token
        server = ServerProcess([*args], env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.kill()


@pytest.fixture
def server(start_server: StartServer, tmp_path: Path) -> ServerProcess:
    return start_server("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0")


@pytest.fixture
def client(server: ServerProcess) -> Iterator[ParamClient]:
    with ParamClient([server.address]) as c:
        yield c
