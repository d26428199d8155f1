"""A run's children end with it even when the run is SIGKILLed (`streamrec.core.parent_watch`),
against real processes: a parameter server started the way `streamrec demo` starts one, and one
started through the `streamrec` console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamrec.core.parent_watch import PARENT_ENV

RUN = """
import json, os, sys, time
from pathlib import Path
from streamrec.app.processes import STREAMREC, Processes, start_param_server
processes = Processes(Path(sys.argv[1]))
start_param_server(processes, "shard", dict(os.environ), ["--port", "0", "--no-checkpoints"])
processes.start("console", [STREAMREC, "param-server", "--port", "0", "--no-checkpoints"], dict(os.environ))
print(json.dumps({name: proc.pid for name, proc in processes.children.items()}), flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(running(pid) for pid in pids):
        time.sleep(0.2)
    return [pid for pid in pids if running(pid)]


def test_the_children_of_a_sigkilled_run_stop(tmp_path: Path) -> None:
    run = subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        children = list(json.loads(run.stdout.readline()).values())
        assert len(children) == 2
        time.sleep(3)  # several of the watch's checks while the run lives: nothing stops
        assert all(running(pid) for pid in children), (tmp_path / "console.log").read_text(errors="replace")
        run.kill()
        run.wait()
        assert wait_gone(children, timeout=30) == [], "children outlived the SIGKILLed run"
    finally:
        run.kill()
        for pid in children:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


WATCHER = """
import os, time
from streamrec.core.parent_watch import PARENT_ENV, exit_with_parent
exit_with_parent()
print(os.environ.get(PARENT_ENV), flush=True)
time.sleep(float(os.environ["SLEEP_S"]))
"""


def test_a_child_of_its_named_parent_keeps_running_and_does_not_pass_the_name_on() -> None:
    env = {**os.environ, PARENT_ENV: str(os.getpid()), "SLEEP_S": "2.5"}
    done = subprocess.run([sys.executable, "-c", WATCHER], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr


def test_a_child_whose_named_parent_is_already_gone_stops_at_once() -> None:
    env = {**os.environ, PARENT_ENV: "1", "SLEEP_S": "600"}  # pid 1 is not this child's parent
    done = subprocess.run([sys.executable, "-c", WATCHER], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM, done.stderr


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for listing in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                children = [int(child) for child in listing.read_text().split()]
            except OSError:  # exited meanwhile
                continue
            found.update(children)
            todo.extend(children)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow  # a bench serving run under load (about 20 s)
def test_a_sigkilled_bench_leaves_neither_its_parameter_server_nor_its_serving_stack(tmp_path: Path) -> None:
    """`bench serving` starts its children itself (not through `Processes`): killed with SIGKILL
    while its load ran, it left a parameter server and a serving group running."""
    env = {**os.environ, "STREAMREC_HOME": str(tmp_path)}
    env.pop("STREAMREC_API_TOKEN", None)
    bench = subprocess.Popen([str(Path(sys.executable).parent / "streamrec"), "bench", "serving", "--items", "500",
                              "--users", "50", "--workers", "2", "--rate", "20", "--duration", "60", "--no-auth-run",
                              "--filter-rate", "0", "--json"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the parameter server, serve and its two workers, the load generator
            below = descendants(bench.pid)
            if any("streamrec.serving.loadgen" in command_line(pid) for pid in below):
                break
            time.sleep(0.2)
        assert len(below) >= 4, f"the bench did not reach its load: {below}"
        below = descendants(bench.pid)
        bench.kill()
        bench.wait()
        left = wait_gone(sorted(below), timeout=30)
        assert left == [], f"the bench's children outlived it: {[command_line(pid) for pid in left]}"
    finally:
        bench.kill()
        for pid in below:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
