"""Stopping child processes: one signal to all of them first, so they wind down together, then a
bounded wait for each before SIGKILL (a shard's final checkpoint, a trainer's last commit)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterable


def stop_children(processes: Iterable[subprocess.Popen], first: int = signal.SIGTERM, grace_s: float = 30.0) -> None:
    """Send `first` to every live process, then wait up to `grace_s` for each; kill what is left."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(first)
    for process in processes:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
