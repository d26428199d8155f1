"""`streamrec bench soak` on a tiny run through the real pipeline (broker, trainer, parameter
server with checkpoints, two serving workers): every event is learned, the report carries the keys
issue 16's checks read plus a series per process, and the parameter server's tables stay within
their row bound although the id space outgrows it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamrec.app.cli import cli
from streamrec.app.processes import STREAMREC
from tests.conftest import settings_env


@pytest.mark.slow  # a bench run of its own (18 s): with the other process-level runs in make test-slow
def test_soak_reports_memory_and_keeps_the_row_bound(settings):
    args = ["bench", "soak", "--events", "20000", "--users", "10000", "--items", "1000", "--max-rows", "4000",
            "--query-rate", "5", "--json"]
    result = CliRunner().invoke(cli, args, env=settings_env(settings), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("trainer_rss_growth", "serving_rss_growth", "param_server_rows", "param_server_row_bound"):
        assert key in data
    series = data["series"]
    assert series["consumed"][-1] == 20000
    assert len(series["trainer_rss_bytes"]) == len(series["serving_rss_bytes"]) == len(series["consumed"])
    assert min(series["trainer_rss_bytes"]) > 0 and min(series["serving_rss_bytes"]) > 0
    assert data["param_server_within_bound"] and data["param_server_rows"] <= data["param_server_row_bound"]
    users = data["tables"]["bpr_users"]
    assert users["max_rows"] == 4000 and users["rows"] <= 4000 and users["evicted_for_room"] > 0


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (each thread's children file)."""
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = {int(k) for k in children.read_text().split()}
            except OSError:
                continue
            frontier.extend(kids - found)
            found |= kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # a bench run of its own (37 s)
def test_sigterm_stops_every_process_the_bench_started(settings):
    """A bench stopped with SIGTERM (a CI timeout, `kill`) unwinds through its `finally` and stops
    its parameter server, trainer and serving workers instead of orphaning them."""
    env = {**os.environ, **settings_env(settings)}
    proc = subprocess.Popen([STREAMREC, "bench", "soak", "--events", "2000000", "--users", "100000", "--items",
                             "10000", "--query-rate", "5", "--json"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(started) < 4:  # param server, trainer, serving and its workers
            time.sleep(0.5)
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
            started = {p for p in _descendants(proc.pid) if "streamrec" in _cmdline(p) or "spawn_main" in _cmdline(p)}
        assert len(started) >= 4, f"the bench started {len(started)} processes"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in started):
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started:  # a failed run leaves nothing behind for the next test either
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
