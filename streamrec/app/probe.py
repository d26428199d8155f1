"""`streamrec probe freshness`: how long until a user's new interactions change their recommendations.

Each trial is a new synthetic user who interacts with a burst of items of one cluster (k-means on
the served item vectors, a cluster absent from the cold-start list); the clock runs from the
moment the broker acknowledged the burst until `/recommend` for that user returns at least
`min_hits` items of that cluster in its top 10. That covers the whole path: broker -> trainer
batch -> parameter-server push -> serving poll and swap -> request.
"""

from __future__ import annotations

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


def _top(http: httpx.Client, user: str) -> list[str]:
    reply = http.get("/recommend", params={"user_id": user, "k": 10})
    reply.raise_for_status()
    return [item["item_id"] for item in reply.json()["items"]]


def run_trial(settings: Settings, http: httpx.Client, ids: np.ndarray, clusters: np.ndarray, cluster: int,
              burst: int, min_hits: int, timeout_s: float, rng: np.random.Generator) -> Trial:
    user = f"probe-{uuid.uuid4().hex[:12]}"
    members = ids[clusters == cluster]
    chosen = rng.choice(members, size=min(burst, len(members)), replace=False)
    publisher = EventPublisher.from_settings(settings, "probe")
    now = time.time()
    for n, item in enumerate(chosen):
        publisher.publish({"user_id": user, "item_id": item, "event_type": "click", "timestamp": now + n * 1e-3},
                          {"probe": user})
    publisher.close()
    start = time.monotonic()
    cluster_items = set(members.tolist())
    while time.monotonic() - start < timeout_s:
        if sum(item in cluster_items for item in _top(http, user)) >= min_hits:
            return Trial(time.monotonic() - start, cluster)
        time.sleep(0.1)
    return Trial(None, cluster)


def probe_freshness(settings: Settings, serving_url: str, trials: int = 20, burst: int = 20, min_hits: int = 3,
                    n_clusters: int = 20, table: str = "bpr_items", timeout_s: float = 180.0,
                    spread_s: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Run `trials` trials, started at random moments within `spread_s` seconds (so they sample
    every phase of the serving poll cycle) and measured concurrently."""
    rng = np.random.default_rng(seed)
    with ParamClient.from_settings(settings) as client:
        ids, clusters = item_clusters(client, table, n_clusters, seed)
    with httpx.Client(base_url=serving_url, timeout=10.0) as http:
        cold = set(_top(http, f"probe-cold-{uuid.uuid4().hex[:8]}"))
        # clusters absent from the cold-start list, big enough that after the burst's items are
        # filtered as seen, plenty of the cluster is left to recommend
        candidates = [c for c in range(n_clusters) if not cold & set(ids[clusters == c].tolist())
                      and (clusters == c).sum() >= 2 * burst]
        if not candidates:
            raise RuntimeError("every cluster is already in the cold-start list; use more clusters")
        results: list[Trial] = []
        lock = threading.Lock()

        def one(delay: float, cluster: int, trial_seed: int) -> None:
            time.sleep(delay)
            with httpx.Client(base_url=serving_url, timeout=10.0) as own:
                trial = run_trial(settings, own, ids, clusters, cluster, burst, min_hits, timeout_s,
                                  np.random.default_rng(trial_seed))
            with lock:
                results.append(trial)

        threads = [threading.Thread(target=one, args=(float(rng.uniform(0, spread_s)), int(rng.choice(candidates)), n))
                   for n in range(trials)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seconds = np.array([t.seconds for t in results if t.seconds is not None])
    return {
        "trials": trials, "reflected": len(seconds), "timeouts": trials - len(seconds),
        "p50_seconds": float(np.percentile(seconds, 50)) if len(seconds) else None,
        "p99_seconds": float(np.percentile(seconds, 99)) if len(seconds) else None,
        "max_seconds": float(seconds.max()) if len(seconds) else None,
        "burst": burst, "min_hits": min_hits, "clusters": n_clusters,
    }
