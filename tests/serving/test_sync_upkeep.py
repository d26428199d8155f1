"""The sync thread's upkeep between polls (re-reading the experiments file) against a real
parameter server: a step that raises is counted and the thread goes on polling and upkeeping."""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY

from streamrec.serving.config import ServingConfig
from streamrec.serving.metrics import serving_metrics
from streamrec.serving.state import StateHolder
from streamrec.serving.sync import Syncer
from streamrec.serving.users import UserCache
from tests.param_server.conftest import ServerProcess
from tests.serving.conftest import wait_for


def sync_failures() -> float:
    return REGISTRY.get_sample_value("streamrec_serving_sync_failures_total") or 0.0


def test_an_upkeep_step_that_raises_is_counted_and_the_sync_thread_goes_on(param_server: ServerProcess,
                                                                           redis_url: str) -> None:
    """An unexpected exception in one upkeep step used to end the sync thread for good: no more
    polls and no more reloads, with nothing counted."""
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise RecursionError("maximum recursion depth exceeded")

    def after() -> None:
        calls.append("after")

    metrics, before = serving_metrics(), sync_failures()
    config = ServingConfig(param_servers=[param_server.address], redis_url=redis_url, poll_interval=0.05)
    syncer = Syncer(config, StateHolder(), metrics, UserCache(config, metrics), between_polls=(broken, after))
    stop = threading.Event()
    thread = threading.Thread(target=syncer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: calls.count("after") >= 3)
        assert thread.is_alive() and syncer.ready.is_set()  # polls went on: the empty server answered
    finally:
        stop.set()
        thread.join(timeout=10)
        syncer.close()
    assert calls.count("broken") >= 3 and sync_failures() - before == calls.count("broken")
