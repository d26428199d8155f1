"""The tests' own safety net (tests/children.py): what a test started and left running is killed
after it, a serving-like group with its workers, so a failing test leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import children
from tests.param_server.conftest import ServerProcess
from tests.test_parent_watch import running, wait_gone

# a group leader that starts a worker and exits, as a serving parent SIGKILLed from outside would
# leave its workers; the leader prints the worker's pid
LEADER = """
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(worker.pid, flush=True)
"""


def test_a_server_left_running_is_killed_and_one_stopped_is_left_alone(tmp_path: Path) -> None:
    env = {**os.environ, "STREAMREC_HOME": str(tmp_path)}
    mark = children.mark()
    stopped = ServerProcess(["--no-checkpoints"], env)
    left = ServerProcess(["--no-checkpoints"], env)
    stopped.stop()
    leaked = children.stop_since(mark)
    assert leaked == [left.proc]
    assert not running(left.proc.pid) and left.proc.returncode is not None
    assert children.stop_since(mark) == []  # nothing tracked twice


def test_a_group_is_killed_with_the_workers_that_outlived_its_leader() -> None:
    mark = children.mark()
    leader = children.track(subprocess.Popen([sys.executable, "-c", LEADER], stdout=subprocess.PIPE, text=True,
                                             start_new_session=True), own_group=True)
    worker = int(leader.stdout.readline())
    leader.wait(30)
    assert running(worker)  # orphaned, still in the leader's group
    try:
        assert children.stop_since(mark) == []  # the leader itself had exited
        assert wait_gone([worker], timeout=10) == []
    finally:
        if running(worker):
            os.kill(worker, 9)
