"""Processes that tests start are stopped even when a test fails before its own stop.

Helpers that start a long-running process (`ServerProcess`, `Serving`, `TrainerProcess`) pass it
to `track`. The autouse fixture `stop_leaked_children` (tests/conftest.py) kills, after each test,
every process tracked during that test that is still running. A failing assertion between a
start and its `try` would otherwise leave a parameter server, a serving group or a trainer
running until the CI machine's leak check, and keep its port and CPU for every later test.

Higher-scoped fixtures start their processes before a test's own function-scoped fixtures, so
the processes of module and session fixtures are tracked before the test's mark and live on.
"""

from __future__ import annotations

import os
import signal
import subprocess

_TRACKED: list[tuple[subprocess.Popen, bool]] = []  # (process, leads its own group)


def track(proc: subprocess.Popen, own_group: bool = False) -> subprocess.Popen:
    """Record `proc`; `own_group`: it was started with `start_new_session=True`, and a kill takes
    its whole process group (a serving parent's workers with it)."""
    _TRACKED.append((proc, own_group))
    return proc


def kill(proc: subprocess.Popen, own_group: bool = False) -> None:
    """SIGKILL `proc` (with `own_group`, its whole group, also where it already exited: its
    workers may outlive it) and reap it."""
    try:
        if own_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def mark() -> int:
    """The point after which `stop_since` counts a process as the current test's."""
    return len(_TRACKED)


def stop_since(mark_: int) -> list[subprocess.Popen]:
    """Kill every process tracked after `mark_` that still runs (and the groups they lead);
    returns the ones that were still running."""
    leaked = []
    for proc, own_group in _TRACKED[mark_:]:
        running = proc.poll() is None
        if running or own_group:
            kill(proc, own_group)
        if running:
            leaked.append(proc)
    del _TRACKED[mark_:]
    return leaked
