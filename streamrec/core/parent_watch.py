"""A run's child processes end with the run, even when the run itself is SIGKILLed.

`streamrec demo`, `chaos`, `simulate` and the benches start parameter servers, trainers, serving
and replays and stop them on the way out. A run
killed with SIGKILL has no way out: its children used to keep running, a trainer consuming and
serving workers holding their ports, until someone found them. The run names itself in the child's
environment (`PARENT_ENV`); the child checks once a second that its parent is still that process
(an orphan is re-parented) and, when it is not, sends itself SIGTERM, so it stops as it would on
any stop: a shard's last checkpoint, a trainer's last commit, serving's drain. A child watches when
it is `python -m streamrec.param_server`, the `streamrec` console script or the serving bench's
empty endpoint; a run names itself with `watched_env`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping

PARENT_ENV = "STREAMREC_EXIT_WITH_PARENT"
POLL_S = 1.0


def watched_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) naming this process as the parent that a child
    started with it must not outlive."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def exit_with_parent() -> None:
    """Watch the parent named by `PARENT_ENV`, if any. The variable is removed from this
    process's environment first, so that its own children (serving's workers) do not watch a
    process that is not their parent."""
    value = os.environ.pop(PARENT_ENV, None)
    if not value:
        return
    try:
        parent = int(value)
    except ValueError as exc:
        raise SystemExit(f"{PARENT_ENV}={value!r} is not a process id") from exc
    threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
