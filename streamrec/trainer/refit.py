"""Periodic batch refits: read the event log, fit a model, publish it for serving by version.

Published artefacts (formats defined by `streamrec.serving.artifacts`):
* factor models: item (and user) vectors assigned into parameter-server tables
  `refit_<model>_items` / `refit_<model>_users`, rows = [vector | bias scalar];
* neighbour models: the top-k neighbour lists as a blob (`refit/item-knn/neighbors` for item-knn,
  `refit/<model>/neighbors` otherwise);
* every model: a manifest blob `refit/<model>/manifest` (dense blob: JSON header + arrays) naming
  the tables and blobs of this version. Serving notices new versions at its next poll.
A refit runs in its own process and only writes new versions, so it never blocks online training.
Artefacts are also written locally (model.save + neighbors.npz) so a refit is reproducible.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.stream.loaders import InteractionLog, load_log
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Recommender

NEIGHBOURS = 100
PERIOD_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_period(text: str) -> float:
    """'10m' -> 600.0; units s, m, h, d (a bare number is seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"bad period {text!r}; expected e.g. 30s, 10m, 1h")
    return float(match.group(1)) * PERIOD_UNITS[match.group(2) or "s"]


def neighbour_lists(model: Recommender, k: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray] | None:
    """(n_items, k) neighbour indices (-1 = none) and scores, best first; None if not meaningful."""
    try:
        ids, scores = model.similar_items(model.items.ids, min(k, model.n_items - 1))
    except NotImplementedError:
        return None
    index = model.items.index(ids.ravel()).reshape(ids.shape)
    index[~np.isfinite(scores) | (scores <= 0)] = -1
    return index, np.where(index >= 0, scores, 0.0)


def fit_with_progress(model: Recommender, data: Interactions) -> float:
    """Fit under a live status line on stderr; returns the fit seconds."""
    from rich.console import Console

    console = Console(file=sys.stderr)
    start = time.perf_counter()
    with console.status(f"fitting {model.name} on {len(data):,} events", spinner="dots"):
        model.fit(data)
    return time.perf_counter() - start


def write_artefacts(model: Recommender, out: Path) -> dict[str, Any]:
    """Save the model and its neighbour lists under `out` (numpy + JSON)."""
    model.save(out / "model")
    files = {"model": str(out / "model")}
    lists = neighbour_lists(model) if model.name in ("item-knn", "amazon-i2i", "user-knn") else None
    if lists is not None:
        np.savez(out / "neighbors.npz", items=model.items.ids.astype(str), neighbors=lists[0].astype(np.int32),
                 scores=lists[1].astype(np.float32))
        files["neighbors"] = str(out / "neighbors.npz")
    return files


def publish(client: Any, model: Recommender, version: int) -> dict[str, Any]:
    """Push vectors into tables and neighbour lists / manifest as blobs; returns what was written."""
    from streamrec.param_server.artifacts import KNN_BLOB, RANKER_BLOB, encode_dense, encode_neighbors

    written: dict[str, Any] = {"tables": {}, "blobs": {}}
    items, users = model.item_vectors(), model.user_vectors()
    if items is not None:
        bias = getattr(model, "b", None)
        vectors = items[:, :-1] if bias is not None else items  # BPR: bias is the last column
        scalars = (bias if bias is not None else np.zeros(len(items)))[:, None]
        for side, ids, vecs, sc in (
            ("items", model.items.ids, vectors, scalars),
            ("users", model.users.ids, None if users is None else (users[:, :-1] if bias is not None else users), None),
        ):
            if vecs is None:
                continue
            table = f"refit_{model.name.replace('-', '_')}_{side}"
            sc = np.zeros((len(vecs), 1)) if sc is None else sc
            client.create_table(table, dim=vecs.shape[1], scalars=1, optimizer="sgd")
            versions = client.assign(table, list(ids.astype(str)), vecs.astype(np.float32), sc.astype(np.float32))
            written["tables"][table] = {"rows": len(vecs), "versions": {str(s): v for s, v in versions.items()}}
    lists = neighbour_lists(model) if model.name in ("item-knn", "amazon-i2i", "user-knn") else None
    if lists is not None:
        blob = KNN_BLOB if model.name == "item-knn" else f"refit/{model.name}/neighbors"
        written["blobs"][blob] = client.put_blob(blob, encode_neighbors(model.items.ids.astype(str), *lists))
    if hasattr(model, "export_ranker"):  # ranking-stage networks: serving rescores with them
        written["blobs"][RANKER_BLOB] = client.put_blob(RANKER_BLOB, encode_dense(*model.export_ranker()))
    manifest = f"refit/{model.name}/manifest"
    header = {"model": model.name, "version": version, "params": model.params, "published_at": time.time(),
              "tables": sorted(written["tables"]), "blobs": sorted(written["blobs"])}
    written["blobs"][manifest] = client.put_blob(
        manifest, encode_dense(header, {"popularity": np.asarray(model.popularity, np.float32)})
    )
    return written


def read_event_log(settings: Any, source: str, fmt: str) -> InteractionLog:
    """The event log from its beginning: `topic` (the interaction topic), `topic:NAME`, or a file."""
    if source == "topic" or source.startswith("topic:"):
        from streamrec.stream.events import EventSchema
        from streamrec.stream.reader import read_log

        topic = source.partition(":")[2] or settings.topic
        log, _ = read_log(settings.kafka_bootstrap, topic, EventSchema.from_settings(settings), settings.kafka_client)
        if not len(log):
            raise ValueError(f"topic {topic!r} holds no valid events yet")
        return log
    return load_log(source, fmt)


def refit_once(
    settings: Any, model_name: str, params: list[str] | tuple[str, ...], source: str, fmt: str,
    out_dir: str | Path | None, do_publish: bool, version: int,
) -> dict[str, Any]:
    """One refit: load the log from the beginning, fit, write artefacts, publish."""
    from streamrec.trainer.models import coerce_params, create

    log = read_event_log(settings, source, fmt)
    model = create(model_name, **coerce_params(model_name, params))
    data = Interactions.from_log(log, implicit=not model.capabilities.explicit)
    fit_seconds = fit_with_progress(model, data)
    out = Path(out_dir) if out_dir else Path(settings.home) / "refits"
    files = write_artefacts(model, out / model_name / f"v{version:06d}")
    report: dict[str, Any] = {
        "model": model_name, "version": version, "events": len(log), "users": data.n_users,
        "items": data.n_items, "fit_seconds": fit_seconds, "artefacts": files,
    }
    if do_publish:
        from streamrec.param_server.client import ParamClient

        with ParamClient.from_settings(settings) as client:
            report["published"] = publish(client, model, version)
    return report


def refit_loop(
    settings: Any, model_name: str, params: list[str] | tuple[str, ...], source: str, fmt: str,
    period: float | None, out_dir: str | Path | None, do_publish: bool,
) -> Iterator[dict[str, Any]]:
    """Refit once, or every `period` seconds (measured start to start) until interrupted."""
    version = int(time.time())
    while True:
        started = time.monotonic()
        yield refit_once(settings, model_name, params, source, fmt, out_dir, do_publish, version)
        if period is None:
            return
        version += 1
        time.sleep(max(0.0, period - (time.monotonic() - started)))
