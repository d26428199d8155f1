"""`streamrec bench serving`: a private parameter server with random vectors, N workers, and an
open-loop load generator in its own process (streamrec.serving.loadgen: constant arrival rate,
latency from the scheduled send time, errors apart from throughput). `--rate R` runs one rate;
`--rate 0` sweeps for saturation: the highest offered rate answered at >= 95% with zero errors.

Each run also measures, in the same run, what it is compared against: the bare FAISS search for
the same queries, and an empty endpoint on the same server stack (streamrec.serving.empty) driven
by the same generator at the same rate or sweep; ratios to both are printed. A second run with the
API token and the seen-item filter on (the filter /recommend has) is reported beside the plain mix
(k=10, explanations and filters off). With a broker reachable, the workers log every answer to an
impressions topic of the run, as in production, and `impressions_logged` counts what arrived.

A run that cannot finish (a process that does not start, a load generator that fails) raises
BenchFailure with one line; whatever it ends with, every process it started is stopped."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.core import net
from streamrec.core.config import Settings
from streamrec.core.parent_watch import watched_env
from streamrec.param_server.artifacts import (
    CATALOGUE_BLOB,
    KNN_BLOB,
    encode_catalogue,
    encode_neighbors,
)
from streamrec.param_server.client import ParamClient
from streamrec.param_server.replica import TableMirror
from streamrec.serving.config import ServingConfig
from streamrec.serving.empty import EMPTY_PATH
from streamrec.serving.index import ItemIndex, query_rows
from streamrec.serving.loadgen import ZIPF_EXPONENT, zipf_users
from streamrec.serving.sweep import find_saturation
from streamrec.stream.catalogue import Categorical, ItemCatalogue
from streamrec.stream.events import EventBatch
from streamrec.stream.impressions import decode_record
from streamrec.stream.kafka import make_consumer
from streamrec.stream.topics import create_topics, delete_topics, end_offsets
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

BENCH_GENRES = 20  # the synthetic catalogue: each item one of 20 genres, so a genre filter keeps ~5%
BENCH_FILTER = "include=genre:g3"
EVENTS_PER_USER = 10
NEIGHBOURS = 20
CHUNK = 50_000
SEARCH_SAMPLES = 2000
BENCH_TOKEN = "bench-serving-token"
WARMUP_S = 1.0
SWEEP_STEP_S = 5.0
STEP_PAUSE_S = 1.0  # lets a server drain what an overloaded step left queued
STDERR_TAIL_CHARS = 600  # of a failed load generator's stderr, in the one-line error
SUMMARY_KEYS = ("offered_rps", "achieved_rps", "p50_ms", "p99_ms", "p999_ms", "max_ms", "errors", "error_status", "broken",
                "timeouts", "dropped", "pass")


class BenchFailure(RuntimeError):
    """The bench could not measure (a process did not start or get ready, the load generator
    failed): the CLI prints it as one line."""


def _start_param_server(home: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "STREAMREC_HOME": str(home)}
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "streamrec.param_server", "--port", "0", "--no-checkpoints"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=watched_env(env))
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            raise BenchFailure("parameter server did not start")
        return proc, json.loads(line)["address"]
    except BaseException:  # stopped while it starts (Ctrl-C, SIGTERM) as much as a failed start
        proc.kill()
        proc.wait()
        raise


def _load(client: ParamClient, rng: np.random.Generator, items: int, users: int, dim: int) -> np.ndarray:
    """Random BPR-layout tables and item-kNN lists; returns the user vectors."""
    client.create_table("bpr_users", dim, max_rows=max(users, 1024) * 2)
    client.create_table("bpr_items", dim, scalars=1, max_rows=max(items, 1024) * 2)
    user_vectors = (rng.normal(size=(users, dim)) / np.sqrt(dim)).astype(np.float32)
    for lo in range(0, users, CHUNK):
        client.assign("bpr_users", [f"u{u}" for u in range(lo, min(users, lo + CHUNK))], user_vectors[lo : lo + CHUNK])
    for lo in range(0, items, CHUNK):
        n = min(items, lo + CHUNK) - lo
        client.assign("bpr_items", [f"i{j}" for j in range(lo, lo + n)],
                      (rng.normal(size=(n, dim)) / np.sqrt(dim)).astype(np.float32),
                      (rng.normal(size=n) * 0.1).astype(np.float32))
    scores = -np.sort(-rng.random((items, NEIGHBOURS), np.float32), axis=1)
    client.put_blob(KNN_BLOB, encode_neighbors([f"i{j}" for j in range(items)],
                                               rng.integers(0, items, (items, NEIGHBOURS)), scores))
    genre = Categorical.from_pairs([f"g{n}" for n in range(BENCH_GENRES)], np.arange(items, dtype=np.int32),
                                   rng.integers(0, BENCH_GENRES, items))
    client.put_blob(CATALOGUE_BLOB, encode_catalogue(ItemCatalogue(
        np.array([f"i{j}" for j in range(items)], dtype=object), {"genre": genre}, {}, {})))
    return user_vectors


def _history(store: FeatureStore, rng: np.random.Generator, items: int, users: int) -> None:
    """EVENTS_PER_USER events per user on Zipf-popular items, through the trainer's writer."""
    n = users * EVENTS_PER_USER
    user_ids = np.array([f"u{u}" for u in np.repeat(np.arange(users), EVENTS_PER_USER)], dtype=object)
    item_ids = np.array([f"i{j}" for j in (rng.zipf(1.2, n) - 1) % items], dtype=object)
    times = 1.7e9 + np.arange(n, dtype=np.float64)
    for lo in range(0, n, 20_000):
        part = slice(lo, lo + 20_000)
        store.write(EventBatch.from_columns(user_ids[part], item_ids[part], np.full(len(user_ids[part]), "click", dtype=object),
                                            times[part]))


def _wait_ready(url: str, workers: int, proc: subprocess.Popen, headers: dict[str, str] | None = None,
                timeout: float = 600.0) -> dict[str, Any]:
    """Polls /readyz on fresh connections until every worker (by pid) has answered 200."""
    pids: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(pids) < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchFailure(f"{url}: workers did not get ready")
        request = urllib.request.Request(url + "/readyz", headers={"Connection": "close", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                body = json.loads(reply.read())
                pids[body["pid"]] = body
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    return next(iter(pids.values()))


class Stack:
    """One server process tree on a free loopback port; stopped with SIGTERM (then killed). The
    wait for its workers can take minutes (a big index), and the bench may be stopped during it
    (Ctrl-C, SIGTERM, a worker that never gets ready): the process is stopped then too, since the
    caller never got a Stack to stop and the serve process outlived the bench."""

    def __init__(self, argv: list[str], env: dict[str, str], workers: int, log: Path) -> None:
        self.port = net.free_port(None, "127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        with log.open("w") as stderr:  # the child holds its own descriptor
            self.proc = subprocess.Popen([*argv, "--port", str(self.port)], env=watched_env(env), stdout=subprocess.DEVNULL,
                                         stderr=stderr)
        try:
            self.ready = _wait_ready(self.url, workers, self.proc)
        except BaseException:  # KeyboardInterrupt and SystemExit (SIGTERM) as much as a failed start
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _loadgen(url: str, template: str, users: int, rate: float, duration: float, max_connections: int,
             headers: dict[str, str]) -> dict[str, Any]:
    """One open-loop run in its own process, so the generator's CPU is not this process's."""
    argv = [sys.executable, "-m", "streamrec.serving.loadgen", "--url", url, "--users", str(users),
            "--rate", str(rate), "--duration", str(duration), "--warmup", str(WARMUP_S),
            "--max-connections", str(max_connections), "--template", template]
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    done = subprocess.run(argv, capture_output=True, text=True, env=watched_env())
    try:
        if done.returncode == 0:
            return json.loads(done.stdout)
    except json.JSONDecodeError:
        pass
    tail = " ".join(done.stderr.split())[-STDERR_TAIL_CHARS:] or "no output on stderr"
    raise BenchFailure(f"the load generator failed (exit {done.returncode}) at {rate} requests/s: {tail}")


def _measure(url: str, template: str, users: int, rate: float, duration: float, max_connections: int,
             headers: dict[str, str]) -> dict[str, Any]:
    """`rate` > 0: one run of `duration`; 0: the saturation sweep (steps of SWEEP_STEP_S), whose
    passing step at the highest rate is the result, with every step under `sweep`."""
    if rate:
        return _loadgen(url, template, users, rate, duration, max_connections, headers)

    def step(offered: float) -> dict[str, Any]:
        result = _loadgen(url, template, users, offered, SWEEP_STEP_S, max_connections, headers)
        time.sleep(STEP_PAUSE_S)
        return result

    best, steps = find_saturation(step)
    result = dict(best) if best is not None else {"achieved_rps": 0.0, "qps": 0.0, "errors": None}
    result["saturation_rps"] = result["achieved_rps"]
    result["sweep"] = [{key: s.get(key) for key in SUMMARY_KEYS} for s in steps]
    return result


def _search_p50_ms(address: str, config: ServingConfig, user_vectors: np.ndarray, k: int) -> float:
    """The bare index search the workers do for the same (Zipf-drawn) users, one query at a time."""
    import faiss

    faiss.omp_set_num_threads(1)
    with ParamClient([address]) as client:
        mirror = TableMirror(client, "bpr_items")
        mirror.sync()
    index = ItemIndex(config.index, config.nprobe, config.ivf_min_items)
    index.rebuild(mirror)
    queries = query_rows(user_vectors[zipf_users(len(user_vectors), SEARCH_SAMPLES, ZIPF_EXPONENT, 0)], mirror)
    fetch = max(config.ann_candidates, k) + EVENTS_PER_USER
    times = []
    for row in range(len(queries)):
        started = time.perf_counter()
        index.search(queries[row : row + 1], fetch)
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1000, 3)


def _impressions_logged(bootstrap: str, topic: str) -> int:
    """Impressions in the one-partition `topic` (each Kafka record holds several, as JSON lines)."""
    end = end_offsets(bootstrap, topic, [0])[0][1]
    consumer = make_consumer(bootstrap)
    try:
        consumer.assign([(topic, 0)])
        seen = logged = 0
        deadline = time.monotonic() + 60
        while seen < end and time.monotonic() < deadline:
            records = consumer.poll(timeout_s=0.5)
            seen += len(records)
            logged += sum(len(decode_record(record.value)) for record in records)
        return logged
    finally:
        consumer.close()


def _memo_hit_share(url: str) -> float | None:
    """The share of the workers' index searches so far that their search memos answered."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("streamrec_serving_search_memo_total{")}
    return _ratio(counts.get("hit", 0.0), counts.get("hit", 0.0) + counts.get("miss", 0.0))


def _ratio(numerator: object, denominator: object) -> float | None:
    if not isinstance(numerator, (int, float)) or not isinstance(denominator, (int, float)) or not denominator:
        return None
    return round(numerator / denominator, 2)


def run_bench(settings: Settings, items: int, users: int, dim: int, workers: int, max_connections: int,
              duration: float, k: int, index: str, rate: float = 0.0, auth_run: bool = True,
              filter_rate: float = 500.0) -> dict[str, Any]:
    """`filter_rate` > 0 adds a run at that rate with a genre filter on (`item_filter`). Rates
    and the duration must be finite (NaN or infinity failed in the load generator, after the
    stack had started)."""
    for name, value in (("rate", rate), ("duration", duration), ("filter_rate", filter_rate)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: a finite number >= 0, not {value}")
    home = Path(tempfile.mkdtemp(prefix="streamrec-bench-serving-"))
    prefix = f"bench-serving-{uuid.uuid4().hex[:8]}"
    redis_up = net.redis_ping(settings.redis_url)
    broker_up = net.port_open(*net.host_port(settings.kafka_bootstrap))
    impressions_topic = f"streamrec.bench.{uuid.uuid4().hex[:8]}.impressions"
    rng = np.random.default_rng(0)
    stacks: list[Stack] = []
    ps_proc: subprocess.Popen | None = None
    topics: list[str] = []  # deleted at the end: only what was created (deleting a missing one raises)

    def start(argv: list[str], env: dict[str, str], log: str) -> Stack:
        stacks.append(Stack(argv, env, workers, home / log))  # a Stack interrupted while it starts stops itself
        return stacks[-1]

    try:
        ps_proc, address = _start_param_server(home)
        started = time.perf_counter()
        with ParamClient([address]) as client:
            user_vectors = _load(client, rng, items, users, dim)
        if redis_up:
            _history(FeatureStore.from_url(settings.redis_url, FeatureStoreConfig.from_settings(settings, prefix)), rng, items, users)
        load_seconds = time.perf_counter() - started
        env = {**os.environ, "STREAMREC_PARAM_SERVERS": address, "STREAMREC_REDIS_URL": settings.redis_url,
               "STREAMREC_HOME": str(home)}
        env.pop("STREAMREC_API_TOKEN", None)
        if broker_up:  # the production path: every answer logged to the impressions topic
            create_topics(settings.kafka_bootstrap, [impressions_topic], 1)
            topics.append(impressions_topic)
            env.update({"STREAMREC_IMPRESSIONS": "on", "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                        "STREAMREC_TOPIC": impressions_topic.removesuffix(".impressions")})
        serve = [sys.executable, "-c", "from streamrec.app.cli import main; main()", "serve", "--workers",
                 str(workers), "--feature-prefix", prefix, "--index", index]
        plain = f"/recommend?user_id=u{{user}}&k={k}&exclude_seen=false"
        filtered = f"/recommend?user_id=u{{user}}&k={k}&exclude_seen=true"

        stack = start(serve, env, "serve.log")
        index_kind = stack.ready["index_kind"]
        result = _measure(stack.url, plain, users, rate, duration, max_connections, {})
        result["search_memo_hit_share"] = _memo_hit_share(stack.url)
        if filter_rate:
            with_filter = _loadgen(stack.url, f"{plain}&{BENCH_FILTER}", users, filter_rate, duration, max_connections,
                                   {})
            result["item_filter"] = {"filter": BENCH_FILTER, "allowed_share": round(1 / BENCH_GENRES, 3),
                                     **{key: with_filter.get(key) for key in SUMMARY_KEYS if key in with_filter}}
        stack.stop()
        if auth_run:
            stack = start(serve, {**env, "STREAMREC_API_TOKEN": BENCH_TOKEN}, "serve-auth.log")
            auth = _measure(stack.url, filtered, users, rate, duration, max_connections,
                            {"Authorization": f"Bearer {BENCH_TOKEN}"})
            stack.stop()
            result["auth_filter"] = {"filter": "exclude_seen=true", "token": True,
                                     **{key: auth.get(key) for key in (*SUMMARY_KEYS, "saturation_rps", "sweep")
                                        if key in auth}}
        stack = start([sys.executable, "-m", "streamrec.serving.empty", "--workers", str(workers)], env, "empty.log")
        empty = _measure(stack.url, EMPTY_PATH, users, rate, duration, max_connections, {})
        stack.stop()
        result["empty_endpoint"] = {key: empty.get(key) for key in (*SUMMARY_KEYS, "saturation_rps", "sweep")
                                    if key in empty}
        config = ServingConfig(index=index)
        result["faiss_search_p50_ms"] = _search_p50_ms(address, config, user_vectors, k)
        result.update({
            "p50_vs_empty_endpoint": _ratio(result.get("p50_ms"), empty.get("p50_ms")),
            "p99_vs_empty_endpoint": _ratio(result.get("p99_ms"), empty.get("p99_ms")),
            "p50_vs_faiss_search": _ratio(result.get("p50_ms"), result["faiss_search_p50_ms"]),
        })
        if not rate:
            result["saturation_vs_empty_endpoint"] = _ratio(result["saturation_rps"], empty["saturation_rps"])
        if broker_up:  # every answer the runs' workers logged (their last batches are flushed at shutdown)
            result["impressions_logged"] = _impressions_logged(settings.kafka_bootstrap, impressions_topic)
        result.update({"impressions": broker_up, "items": items, "users": users, "dim": dim, "workers": workers,
                       "concurrency": max_connections, "max_connections": max_connections, "k": k,
                       "request": plain.replace("{user}", "<zipf>"), "index": index_kind, "redis": redis_up,
                       "load_seconds": round(load_seconds, 1)})
        return result
    finally:
        for stack in stacks:
            stack.stop()  # SIGTERM first: the serve process then stops its workers too
        if ps_proc is not None:
            ps_proc.kill()
            ps_proc.wait()
        if redis_up:
            FeatureStore.from_url(settings.redis_url, FeatureStoreConfig.from_settings(settings, prefix)).clear()
        if topics:
            delete_topics(settings.kafka_bootstrap, topics)
        shutil.rmtree(home, ignore_errors=True)
