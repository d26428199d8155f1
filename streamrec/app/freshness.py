"""`streamrec bench freshness`: the freshness probe while a replay loads the pipeline, in one command.

A private stack (streamrec.app.stack: parameter server with checkpoints, online trainer, serving
polling every `poll` seconds) is seeded with a log (replayed unpaced, learned, served); then
`streamrec replay` runs as its own process at `replay_rate` events per second (the log's
interactions, cycled, stamped at that rate from now on), and `streamrec probe freshness` runs its
trials while it does. Timed-out trials count in the p99 as their timeout (streamrec.app.probe).

Every number is checked before the stack starts: a NaN rate skipped the replay (NaN > 0 is false)
and reported itself as the rate, a rate too small for the replay's length planned no event at
all, and a negative trial count ran no trial; each of those printed a result.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streamrec.app.probe import check_trials, probe_freshness
from streamrec.app.processes import STREAMREC, pipeline_env, read_json
from streamrec.app.stack import Stack, StackOptions, running_stack
from streamrec.core.config import Settings
from streamrec.stream.loaders import InteractionLog
from streamrec.stream.publish import EventPublisher
from streamrec.stream.replay import replay


def planned_events(rate: float, seconds: float) -> int:
    """Events a replay at `rate` per second for `seconds` sends (0: no replay, for rate 0).
    Raises ValueError for a rate or length that is not a finite number >= 0 (> 0 for the
    length), and for a rate above 0 that plans no event."""
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"replay rate: a finite number of events per second >= 0, not {rate}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"replay seconds: a finite number above 0, not {seconds}")
    planned = int(rate * seconds)
    if rate > 0 and planned == 0:
        raise ValueError(f"a replay at {rate:g} events/s for {seconds:g} s plans no event; replay at least "
                         f"{1 / seconds:.3g} events/s, or 0 for no replay")
    return planned


def write_paced_log(log: InteractionLog, rate: float, seconds: float, path: Path) -> int:
    """A csv log of `rate * seconds` events: `log`'s interactions cycled, timestamps `1 / rate`
    apart from now, so `streamrec replay --speed 1` sends it at `rate` events per second."""
    n = planned_events(rate, seconds)
    rows = np.arange(n) % len(log)
    frame = pd.DataFrame({"user_id": log.user_id[rows], "item_id": log.item_id[rows],
                          "rating": log.rating[rows], "event_type": log.event_types()[rows],
                          "timestamp": time.time() + np.arange(n) / rate})
    frame.to_csv(path, index=False)
    return n


def _wait_consumed(stack: Stack, at_least: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stack.processes.check()
        consumed = (read_json(stack.report_path) or {}).get("consumed") or 0
        if consumed >= at_least:
            return consumed
        time.sleep(0.5)
    raise TimeoutError(f"the trainer consumed fewer than {at_least} events in {timeout_s} s")


def bench_freshness(settings: Settings, log: InteractionLog, replay_rate: float, replay_seconds: float,
                    poll: float, trials: int, spread_s: float, timeout_s: float, burst: int = 20,
                    min_hits: int = 3) -> dict[str, Any]:
    """The probe's report on a stack seeded with `log` (read by the caller, timestamps required:
    the seeding replays it at its own times), while a paced replay runs; the options are checked
    (ValueError) before the stack starts."""
    planned_events(replay_rate, replay_seconds)
    if not math.isfinite(poll) or poll <= 0:
        raise ValueError(f"poll: a finite number of seconds above 0, not {poll}")
    check_trials(trials, burst, min_hits, timeout_s, spread_s)
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-freshness-") as tmp:
        work = Path(tmp)
        with running_stack(settings, work, StackOptions(poll_interval=poll)) as stack:
            publisher = EventPublisher.from_settings(stack.settings, "bench-freshness")
            seeded = replay(log, publisher).produced
            publisher.close()
            _wait_consumed(stack, seeded, 300)
            stack.wait_ready()
            load = work / "load.csv"
            planned = write_paced_log(log, replay_rate, replay_seconds, load) if replay_rate else 0
            if planned:
                stack.processes.start("replay", [STREAMREC, "replay", "--data", str(load), "--format", "csv",
                                                 "--speed", "1", "--json"], pipeline_env(stack.settings),
                                      read_stdout=True)
                _wait_consumed(stack, seeded + 1, 120)  # the load reaches the trainer before the trials
            started = time.monotonic()
            result = probe_freshness(stack.settings, stack.serving_url, trials, burst, min_hits,
                                     timeout_s=timeout_s, spread_s=spread_s)
            probe_seconds = time.monotonic() - started
            replayed: dict[str, Any] = {}
            if planned:
                out, _ = stack.processes.children["replay"].communicate(timeout=replay_seconds + 120)
                replayed = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            report = read_json(stack.report_path) or {}
    return {
        **result, "poll_seconds": poll, "seeded_events": seeded, "source": log.source,
        "replay_rate": replay_rate, "replay_planned_events": planned,
        "replay_achieved_events_per_second": replayed.get("events_per_second"),
        "probe_seconds": round(probe_seconds, 1),
        "trainer_events_per_second": report.get("events_per_second"), "trainer_lag_at_end": report.get("lag"),
    }
