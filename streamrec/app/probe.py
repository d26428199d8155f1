"""`streamrec probe freshness`: how long until a user's new interactions change their recommendations.

Each trial is a new synthetic user who interacts with a burst of items of one cluster (k-means on
the item vectors as they are when the trial starts, a cluster absent from the cold-start list);
the clock runs from the
moment the broker acknowledged the burst until `/recommend` for that user returns at least
`min_hits` items of that cluster in its top 10. That covers the whole path: broker -> trainer
batch -> parameter-server push -> serving poll and swap -> request.

A trial that is never reflected counts in the percentiles as its timeout (leaving it out would
flatter the tail); `timeouts` says how many there were, and `timed_out` what serving answered for
each at the end (whether it knew the user at all, how many cluster items it ranked) beside the
same top 10 computed from the parameter server's rows: serving behind the server means the
pipeline lost the update; both short of `min_hits` means the model learned the burst too weakly.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from streamrec.core.config import Settings
from streamrec.param_server.client import ParamClient
from streamrec.stream.publish import EventPublisher


@dataclass(frozen=True)
class Trial:
    seconds: float | None  # None: not reflected before the timeout
    cluster: int
    user: str
    hits: int  # cluster items in the last top 10 served
    cold_start: bool  # serving had no vector for the user in its last answer
    model_hits: int | None = None  # timed out: cluster items in the top 10 of the parameter server's own rows
    row_seconds: float | None = None  # when serving first answered with the user's row (None: never)
    row_hits: int | None = None  # cluster items in that first answer


def item_clusters(client: ParamClient, table: str, n_clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, cluster of each) from k-means on the item table's vectors."""
    import faiss

    delta = client.delta(table, 0)
    ids = np.array(delta.ids.to_list(), dtype=object)
    vectors = np.ascontiguousarray(delta.values[:, : delta.dim], dtype=np.float32)
    if len(ids) < n_clusters * 5:
        raise RuntimeError(f"table {table!r} has {len(ids)} items: too few to probe (train the model first)")
    kmeans = faiss.Kmeans(delta.dim, n_clusters, niter=20, seed=seed, spherical=True)
    kmeans.train(vectors)
    _, assignment = kmeans.index.search(vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-9), 1)
    return ids, assignment.ravel()


def _recommend(http: httpx.Client, user: str) -> tuple[list[str], bool]:
    """(top-10 item ids, cold start) for `user`."""
    reply = http.get("/recommend", params={"user_id": user, "k": 10})
    reply.raise_for_status()
    body = reply.json()
    return [item["item_id"] for item in body["items"]], bool(body.get("cold_start"))


def model_hits(client: ParamClient, user_table: str, item_table: str, user: str, seen: np.ndarray,
               cluster_items: set[str]) -> int | None:
    """Cluster items in the user's top 10 by the parameter server's rows (p_u . q_i + b_i over every
    item not in `seen`, as serving scores them); None when the server has no row for the user."""
    pulled = client.pull(user_table, [user])
    if not pulled.found[0]:
        return None
    items = client.delta(item_table, 0)
    ids = np.array(items.ids.to_list(), dtype=object)
    scores = items.values[:, : items.dim] @ pulled.vectors[0]
    if items.values.shape[1] > items.dim:
        scores = scores + items.values[:, items.dim]
    if pulled.values.shape[1] > pulled.dim:
        scores = scores + pulled.values[0, pulled.dim]
    scores[np.isin(ids, seen)] = -np.inf
    top = ids[np.argsort(-scores, kind="stable")[:10]]
    return sum(item in cluster_items for item in top.tolist())


def pick_cluster(client: ParamClient, http: httpx.Client, table: str, n_clusters: int, burst: int,
                 rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """(cluster, its item ids) from k-means on the item vectors as they are NOW, among clusters
    absent from the cold-start list and big enough that after the burst's items are filtered as
    seen, plenty of the cluster is left to recommend. Computed per trial: while a replay trains
    the model hard, item vectors move within seconds, and a cluster computed when the probe
    started no longer matches what a burst teaches the user (issue 16's lost trial)."""
    ids, clusters = item_clusters(client, table, n_clusters, int(rng.integers(2**31)))
    cold = set(_recommend(http, f"probe-cold-{uuid.uuid4().hex[:8]}")[0])
    candidates = [c for c in range(n_clusters) if not cold & set(ids[clusters == c].tolist())
                  and (clusters == c).sum() >= 2 * burst]
    if not candidates:
        raise RuntimeError("every cluster is already in the cold-start list; use more clusters")
    cluster = int(rng.choice(candidates))
    return cluster, ids[clusters == cluster]


def run_trial(settings: Settings, http: httpx.Client, n_clusters: int, burst: int, min_hits: int, timeout_s: float,
              rng: np.random.Generator, item_table: str = "bpr_items", user_table: str = "bpr_users") -> Trial:
    user = f"probe-{uuid.uuid4().hex[:12]}"
    with ParamClient.from_settings(settings) as client:
        cluster, members = pick_cluster(client, http, item_table, n_clusters, burst, rng)
    chosen = rng.choice(members, size=min(burst, len(members)), replace=False)
    publisher = EventPublisher.from_settings(settings, "probe")
    now = time.time()
    for n, item in enumerate(chosen):
        publisher.publish({"user_id": user, "item_id": item, "event_type": "click", "timestamp": now + n * 1e-3},
                          {"probe": user})
    publisher.close()
    start = time.monotonic()
    cluster_items = set(members.tolist())
    first_row: dict[str, float | int] = {}  # row_seconds, row_hits: serving's first answer from the user's row
    while True:
        top, cold = _recommend(http, user)
        hits = sum(item in cluster_items for item in top)
        elapsed = time.monotonic() - start
        if not first_row and not cold:
            first_row = {"row_seconds": elapsed, "row_hits": hits}
        if hits >= min_hits:
            return Trial(elapsed, cluster, user, hits, cold, **first_row)
        if elapsed >= timeout_s:
            with ParamClient.from_settings(settings) as client:
                learned = model_hits(client, user_table, item_table, user, chosen, cluster_items)
            return Trial(None, cluster, user, hits, cold, learned, **first_row)
        time.sleep(0.1)


def check_trials(trials: int, burst: int, min_hits: int, timeout_s: float, spread_s: float,
                 n_clusters: int = 20) -> None:
    """Raises ValueError unless trials, burst, min_hits and n_clusters are at least 1, min_hits
    at most 10 (the top 10 is what is read), the timeout finite and above 0 and the spread finite
    and >= 0."""
    for name, count in (("trials", trials), ("burst", burst), ("min_hits", min_hits), ("clusters", n_clusters)):
        if count < 1:
            raise ValueError(f"{name}: at least 1, not {count}")
    if min_hits > 10:
        raise ValueError(f"min_hits: at most 10 (items of the top 10), not {min_hits}")
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout: a finite number of seconds above 0, not {timeout_s}")
    if not math.isfinite(spread_s) or spread_s < 0:
        raise ValueError(f"spread: a finite number of seconds >= 0, not {spread_s}")


def probe_freshness(settings: Settings, serving_url: str, trials: int = 20, burst: int = 20, min_hits: int = 3,
                    n_clusters: int = 20, table: str = "bpr_items", timeout_s: float = 180.0,
                    spread_s: float = 0.0, seed: int = 0, user_table: str = "bpr_users") -> dict[str, Any]:
    """Run `trials` trials, started at random moments within `spread_s` seconds (so they sample
    every phase of the serving poll cycle) and measured concurrently. The numbers are checked
    first (ValueError): -3 trials ran none and reported p99 None with -3 requested and -3 errors,
    and a negative timeout ended every trial at its first answer."""
    check_trials(trials, burst, min_hits, timeout_s, spread_s, n_clusters)
    rng = np.random.default_rng(seed)
    with ParamClient.from_settings(settings) as client:
        item_clusters(client, table, n_clusters, seed)  # fail early when the model is too small to probe
    results: list[Trial] = []
    lock = threading.Lock()

    def one(delay: float, trial_seed: int) -> None:
        time.sleep(delay)
        with httpx.Client(base_url=serving_url, timeout=10.0) as own:
            trial = run_trial(settings, own, n_clusters, burst, min_hits, timeout_s,
                              np.random.default_rng(trial_seed), table, user_table)
        with lock:
            results.append(trial)

    threads = [threading.Thread(target=one, args=(float(rng.uniform(0, spread_s)), seed * 1000 + n))
               for n in range(trials)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarise(results, timeout_s) | {"requested": trials, "errors": trials - len(results), "burst": burst,
                                            "min_hits": min_hits, "clusters": n_clusters}


def summarise(results: list[Trial], timeout_s: float) -> dict[str, Any]:
    """Percentiles over every trial, a timed-out one counting as `timeout_s`; the reflected-only
    figures beside them; and what serving last answered for each timed-out trial."""
    reflected = np.array([t.seconds for t in results if t.seconds is not None])
    counted = np.array([timeout_s if t.seconds is None else t.seconds for t in results])
    lost = [t for t in results if t.seconds is None]
    # a timeout where the server's own rows do reflect the burst (or serving lacks a user the
    # server has) is the pipeline's; one where neither does is the model's
    pipeline = [t for t in lost if t.model_hits is not None and (t.cold_start or t.model_hits > t.hits)]
    return {
        "trials": len(results), "reflected": len(reflected), "timeouts": len(lost), "timeout_seconds": timeout_s,
        "p50_seconds": float(np.percentile(counted, 50)) if len(counted) else None,
        "p99_seconds": float(np.percentile(counted, 99)) if len(counted) else None,
        "max_seconds": float(counted.max()) if len(counted) else None,
        "p99_reflected_seconds": float(np.percentile(reflected, 99)) if len(reflected) else None,
        "timeouts_serving_behind_model": len(pipeline),
        # where the time went: reflected while serving had no row for the user (the fold-in of
        # their recent items), and for each trial slower than 2 s, when serving first answered
        # from the user's row and how many of the cluster's items that answer held
        "reflected_by_fold_in": sum(t.seconds is not None and t.cold_start for t in results),
        "slow": [{"seconds": round(t.seconds or timeout_s, 2), "row_seconds": t.row_seconds,
                  "row_hits": t.row_hits} for t in results if t.seconds is None or t.seconds > 2.0],
        "timed_out": [{"user": t.user, "cluster": t.cluster, "hits": t.hits, "cold_start": t.cold_start,
                       "model_hits": t.model_hits} for t in lost],
    }
