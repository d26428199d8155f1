"""What the benches and the simulator leave behind and report when a run is cut short or sized
down, against real processes, a real broker and a real parameter server:
- `bench serving` stopped (SIGTERM is SystemExit under `streamrec`) while a serving stack waits
  for its workers stops that stack's process (it outlived the bench);
- a failed load generator is one line with its stderr, not a CalledProcessError;
- `bench stream` deletes its topics whatever fails after it created them;
- `bench param-server` says how many rows its delta and checkpoint figures measured;
- the simulator waits for serving to listen before it reads serving's /readyz or /metrics."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import httpx
import numpy as np
import pytest

from streamrec.app import simulate
from streamrec.app.processes import Processes
from streamrec.app.stack import Stack as PipelineStack
from streamrec.core import net
from streamrec.param_server import bench as ps_bench
from streamrec.serving import bench as serving_bench
from streamrec.stream import bench as stream_bench
from streamrec.stream.topics import list_topics

MARKER = "streamrec-test-never-ready"


def live_children(marker: str) -> list[int]:
    """This process's children (zombies aside) whose command line holds `marker`."""
    found = []
    for listing in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in listing.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:  # exited meanwhile
                continue
            if marker in cmdline and state != "Z":
                found.append(int(pid))
    return found


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # what `streamrec`'s main() makes of SIGTERM


def test_a_stack_stopped_while_it_gets_ready_stops_its_process(tmp_path) -> None:
    """The serve process was started, then the wait for its workers was interrupted before the
    bench had it in its list: the bench exited and serve kept running."""
    argv = [sys.executable, "-c", f"import time; time.sleep(120)  # {MARKER}"]
    previous = signal.signal(signal.SIGALRM, _exit)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)  # while Stack polls /readyz of a process that never listens
        with pytest.raises(SystemExit):
            serving_bench.Stack(argv, dict(os.environ), 1, tmp_path / "serve.log")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        orphans = live_children(MARKER)
        for pid in orphans:  # leave nothing behind when the check fails
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert orphans == []


def test_a_failed_load_generator_is_one_line_with_its_stderr() -> None:
    """The generator's exit status came back as CalledProcessError (a traceback with no reason)."""
    with pytest.raises(serving_bench.BenchFailure,
                       match=r"load generator failed \(exit 1\).*KeyError: 'nope'") as failure:
        serving_bench._loadgen("http://127.0.0.1:9", "/recommend?user_id={nope}", 5, 10.0, 1.0, 4, {})
    assert "\n" not in str(failure.value)


@pytest.mark.parametrize("args", [["--rate", "nan"], ["--rate", "inf"], ["--rate", "0"], ["--rate", "10", "--duration",
                                                                                          "inf"]])
def test_the_load_generator_refuses_numbers_that_are_not_finite(args) -> None:
    done = subprocess.run([sys.executable, "-m", "streamrec.serving.loadgen", "--url", "http://127.0.0.1:9", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"argument {args[-2]}" in done.stderr


def test_bench_stream_deletes_its_topics_when_it_fails_after_creating_them(settings, monkeypatch) -> None:
    """Topics were created outside the try/finally that deletes them: an unknown client (or Ctrl-C
    while producing) left both on the broker."""
    created: list[str] = []
    create = stream_bench.create_topics

    def recording(bootstrap: str, names: list[str], partitions: int) -> dict:
        created.extend(names)
        return create(bootstrap, names, partitions)

    monkeypatch.setattr(stream_bench, "create_topics", recording)
    with pytest.raises(ValueError, match="unknown Kafka client"):
        stream_bench.bench_stream(settings, 10, "no-such-client", 1)
    assert len(created) == 2
    deadline = time.monotonic() + 30  # deletion is asynchronous on the broker
    while set(created) & set(list_topics(settings.kafka_bootstrap)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(created) & set(list_topics(settings.kafka_bootstrap))


def test_param_server_figures_say_how_many_rows_they_measured(tmp_path) -> None:
    """`delta_seconds_100k` and `checkpoint_seconds_1m` keep their names at any --ids: the rows
    beside them say what was measured."""
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(-(2**62), 2**62, 3000, dtype=np.int64))
    grads = rng.normal(size=(256, 4 + ps_bench.SCALARS)).astype(np.float32) * 0.01
    result = ps_bench._remote(ids, 4, 256, grads, str(tmp_path))
    assert result["delta_rows"] == ids.size and result["checkpoint_rows"] == ids.size
    assert result["delta_seconds_100k"] >= 0 and result["checkpoint_seconds_1m"] >= 0


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the handler's name)
        body = json.dumps({"synced_version": 7}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_simulator_waits_until_serving_listens(tmp_path) -> None:
    """Serving listens once it has a model (or after its first-poll wait): reading /readyz or
    /metrics before then was a ConnectError traceback."""
    port = net.free_port()
    servers: list[http.server.ThreadingHTTPServer] = []

    def listen_late() -> None:
        time.sleep(1.0)
        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), _Ready))
        servers[0].serve_forever()

    threading.Thread(target=listen_late, daemon=True).start()
    stack = PipelineStack(None, Processes(tmp_path), f"http://127.0.0.1:{port}", tmp_path / "trainer.json",
                          "http://127.0.0.1:9/metrics")
    try:
        with httpx.Client(base_url=stack.serving_url, timeout=5.0) as http_client:
            assert simulate.wait_serving(stack, http_client, 60.0) == {"synced_version": 7}
    finally:
        deadline = time.monotonic() + 10
        while not servers and time.monotonic() < deadline:
            time.sleep(0.05)
        for server in servers:
            server.shutdown()
