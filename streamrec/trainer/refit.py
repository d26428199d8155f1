"""Periodic batch refits: read the event log, fit a model, publish it for serving by version.

What is published is what the model's `export()` says (formats in `streamrec.param_server.artifacts`):
* retrieval vectors: item (and user) vectors assigned into new parameter-server tables of this
  version, rows = [vector | scalar], the scalar being the item bias where the model keeps one
  apart (else 0), then switched in under the names `refit_<model>_items` / `refit_<model>_users`
  by one alias blob (`streamrec.param_server.table_alias`);
* item neighbour lists: the top-k neighbours as the blob `refit/<model>/neighbors` (for item-knn
  that is `KNN_BLOB`, the one serving reads);
* a ranking-stage network: the dense blob `RANKER_BLOB`;
* every model: a manifest blob `refit/<model>/manifest` (dense blob: JSON header + arrays) naming
  the tables and blobs of this version. Serving notices new versions at its next poll.
A refit runs in its own process and only writes new versions, so it never blocks online training.
Artefacts are also written locally (model.save + neighbors.npz) so a refit is reproducible.
A refit loop (`--every`) serves Prometheus metrics on STREAMREC_METRICS_PORT (`refit_metrics`).
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from prometheus_client import start_http_server

from streamrec.core.config import Settings
from streamrec.core.params import parse_params
from streamrec.param_server.artifacts import RANKER_BLOB, encode_dense, encode_neighbors
from streamrec.param_server.client import ParamClient, ParamServerError
from streamrec.param_server.table_alias import (
    AliasError,
    alias_blob,
    encode_alias,
    is_version_of,
    physical_name,
    read_alias,
    unreadable,
)
from streamrec.stream.impressions import decode_record, shown_pairs
from streamrec.stream.kafka import KafkaError
from streamrec.stream.loaders import InteractionLog
from streamrec.stream.reader import is_topic_source, read_event_log, read_records
from streamrec.trainer import refit_metrics
from streamrec.trainer.engines import Engine, model_class
from streamrec.trainer.features import with_side_data
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Recommender
from streamrec.trainer.models.export import Export, NeighbourLists
from streamrec.trainer.ranks import is_primary, world

PERIOD_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LOOP_PERIOD_S = 365 * 86400  # a year: a longer pause is no loop, and past ~292 years sleep() overflows
KEEP_ARTEFACTS = 3  # version folders kept per model under --out
logger = logging.getLogger(__name__)


def parse_period(text: str) -> float:
    """'10m' -> 600.0; units s, m, h, d (a bare number is seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"bad period {text!r}; expected e.g. 30s, 10m, 1h")
    return float(match.group(1)) * PERIOD_UNITS[match.group(2) or "s"]


def parse_loop_period(text: str) -> float:
    """`parse_period` for how often a loop runs (`--every`, `--seed-every`): more than zero (0s
    ran rounds back to back, or was silently ignored) and at most MAX_LOOP_PERIOD_S (a longer one
    was accepted, then the sleep after the first round died with OverflowError)."""
    seconds = parse_period(text)
    if not 0 < seconds <= MAX_LOOP_PERIOD_S:
        raise ValueError(f"period {text.strip()!r} must be more than 0s and at most {MAX_LOOP_PERIOD_S // 86400}d")
    return seconds


def fit_with_progress(model: Recommender, data: Interactions) -> float:
    """Fit under a live status line on stderr; returns the fit seconds."""
    from rich.console import Console

    console = Console(file=sys.stderr)
    start = time.perf_counter()
    with console.status(f"fitting {model.name} on {len(data):,} events", spinner="dots"):
        model.fit(data)
    return time.perf_counter() - start


def neighbours_blob(model: Recommender, lists: NeighbourLists) -> bytes:
    """The neighbour lists as serving reads them (the same bytes go to the local artefact)."""
    return encode_neighbors(model.items.ids, lists.indices, lists.scores)


def prune_artefacts(folder: Path, keep: int) -> None:
    """Remove all but the newest `keep` version folders (`vNNNNNN`) of one model: a refit loop wrote
    one every period and never removed any (20 MB a refit for item-knn on MovieLens 100K, about
    3 GB a day at the compose default of every 10 minutes)."""
    versions = sorted((path for path in folder.glob("v*") if path.is_dir() and path.name[1:].isdigit()),
                      key=lambda path: int(path.name[1:]), reverse=True)
    for old in versions[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def write_artefacts(model: Recommender, export: Export, out: Path) -> dict[str, Any]:
    """Save the model and its neighbour lists, if it exports any, under `out` (numpy + JSON)."""
    model.save(out / "model")
    files = {"model": str(out / "model")}
    if export.neighbours is not None:
        (out / "neighbors.npz").write_bytes(neighbours_blob(model, export.neighbours))
        files["neighbors"] = str(out / "neighbors.npz")
    return files


def stable_width(model: Recommender, export: Export) -> Export:
    """`export` with the popularity-blend coordinate always there when the model exports user and
    item vectors: zero on both sides when the weight is 0, which changes no dot product, norm or
    distance. The weight is chosen on validation at each fit and moved between 0 and not 0 as the
    log grew, so the tables' width flipped between refits and the next create_table was refused."""
    if model.blend_weight or export.item_vectors is None or export.user_vectors is None:
        return export
    return replace(export, item_vectors=np.hstack([export.item_vectors, np.zeros((len(export.item_vectors), 1),
                                                                                 export.item_vectors.dtype)]),
                   user_vectors=np.hstack([export.user_vectors, np.zeros((len(export.user_vectors), 1),
                                                                         export.user_vectors.dtype)]))


@dataclass(frozen=True)
class StagedTables:
    """A refit's tables written and not yet switched in (`stage_tables`, then `switch_tables`)."""

    alias: str  # the alias blob that switches them in
    expect: int  # its version when the tables were begun (0: none yet)
    replaced: dict[str, str]  # logical -> physical of the version it will replace
    aliases: dict[str, str]  # logical -> physical of this version
    version: int


def stage_tables(client: ParamClient, model: Recommender, export: Export, version: int,
                 written: dict[str, Any]) -> StagedTables:
    """Write this version's item (and user) vectors into new tables that nothing names yet. A
    staging that fails drops what it wrote (a refit failing at every period left a whole copy of
    its tables each time, growing the server without bound)."""
    if export.item_vectors is None:
        raise ValueError(f"{model.name} exports no item vectors: there are no tables to publish")
    biases = export.item_biases if export.item_biases is not None else np.zeros(len(export.item_vectors))
    prefix = f"refit_{model.name.replace('-', '_')}"
    sides = [(f"{prefix}_items", model.items.ids, export.item_vectors, biases)]
    if export.user_vectors is not None:
        sides.append((f"{prefix}_users", model.users.ids, export.user_vectors, np.zeros(len(export.user_vectors))))
    expect, replaced = current_alias(client, sides[0][0])
    aliases: dict[str, str] = {}
    staged = False
    try:
        for logical, ids, vectors, scalars in sides:
            table = aliases[logical] = physical_name(logical, version)
            client.create_table(table, dim=vectors.shape[1], scalars=1, optimizer="sgd")
            versions = client.assign(table, list(ids), vectors.astype(np.float32),
                                     scalars[:, None].astype(np.float32))
            written["tables"][table] = {"rows": len(vectors), "versions": {str(s): v for s, v in versions.items()}}
        staged = True
    finally:
        if not staged:
            drop_quietly(client, list(aliases.values()))
    return StagedTables(alias_blob(sides[0][0]), expect, replaced, aliases, version)


def current_alias(client: ParamClient, item_table: str) -> tuple[int, dict[str, str]]:
    """(version, map) of the alias this refit will replace. One that cannot be read (not an
    alias, or not signed with the token) is replaced like any other, as naming nothing to keep: a
    refit that failed on it left it there for good, and serving with it."""
    try:
        return read_alias(client, item_table)
    except (AliasError, ParamServerError) as exc:
        if not unreadable(exc):
            raise
        logger.error("table alias %s cannot be read (%s): this refit replaces it", alias_blob(item_table), exc)
        return client.blob_version(alias_blob(item_table)) or 0, {}


def drop_quietly(client: ParamClient, tables: list[str]) -> None:
    """Drop `tables` on the way out of a failure: one that cannot be dropped now (the server is
    down: the likely cause) is left for the next successful publish, which drops unnamed versions."""
    for table in tables:
        try:
            client.drop_table(table)
        except (ParamServerError, OSError) as exc:
            logger.warning("table %s of a failed refit not dropped (%s); the next publish drops it", table, exc)


def switch_tables(client: ParamClient, staged: StagedTables) -> tuple[int, list[str]]:
    """Put the alias naming the staged tables, only over the version read when they were begun:
    of two refits of one model publishing at once (two replicas of a refit service), the later
    one fails here and drops its own tables, so the alias never names tables the other dropped.
    Then drop the versions older than the one replaced, among the tables that existed before the
    alias was put: a table made after it belongs to a refit that read this alias, whose own
    compare and set decides its fate. Returns (alias version, dropped tables)."""
    existing = list(client.tables())
    try:
        alias_version = client.put_blob(staged.alias, encode_alias(staged.version, staged.aliases), expect=staged.expect)
    except ParamServerError as exc:
        if exc.kind != "BlobConflict":
            raise
        drop_quietly(client, list(staged.aliases.values()))
        raise ParamServerError(exc.kind, f"another refit published {staged.alias} while this one wrote its tables: "
                               "that version stays, this one's tables are dropped", exc.shard) from exc
    return alias_version, drop_old_versions(client, existing, staged.aliases, staged.replaced)


def publish(client: ParamClient, model: Recommender, version: int, export: Export | None = None) -> dict[str, Any]:
    """Publish exactly what `export` (default: `model.export()`) describes, then the manifest;
    returns what was written.

    Vectors go into new tables of this version, switched in by one alias blob once both sides are
    whole (`streamrec.param_server.table_alias`): a reader never sees the item table of one fit
    with the user table of another, and a refit killed half-way leaves the last version served.
    Tables of versions older than the one replaced are dropped (also those a killed refit left)."""
    export = stable_width(model, model.export() if export is None else export)
    written: dict[str, Any] = {"tables": {}, "blobs": {}}
    if export.item_vectors is not None:
        staged = stage_tables(client, model, export, version, written)
        written["blobs"][staged.alias], written["dropped"] = switch_tables(client, staged)
        written["aliases"] = staged.aliases
    if export.neighbours is not None:
        blob = f"refit/{model.name}/neighbors"
        written["blobs"][blob] = client.put_blob(blob, neighbours_blob(model, export.neighbours))
    if export.ranker is not None:
        written["blobs"][RANKER_BLOB] = client.put_blob(RANKER_BLOB, encode_dense(export.ranker.header, export.ranker.arrays))
    manifest = f"refit/{model.name}/manifest"
    header = {"model": model.name, "version": version, "params": model.params, "published_at": time.time(),
              "tables": sorted(written["tables"]), "aliases": written.get("aliases", {}),
              "blobs": sorted(written["blobs"])}
    written["blobs"][manifest] = client.put_blob(
        manifest, encode_dense(header, {"popularity": np.asarray(model.popularity, np.float32)})
    )
    return written


def drop_old_versions(client: ParamClient, existing: list[str], aliases: dict[str, str],
                      replaced: dict[str, str]) -> list[str]:
    """Drop every table of `existing` that is a version of the published logical names, except the
    new version and the one it replaced (serving workers may be reading it until their next poll);
    returns the dropped."""
    keep = set(aliases.values()) | {replaced.get(logical, logical) for logical in aliases}
    dropped = sorted(table for table in existing if table not in keep
                     and any(is_version_of(table, logical) for logical in aliases))
    for table in dropped:
        client.drop_table(table)
    if dropped:
        logger.info("dropped tables of older refits: %s", ", ".join(dropped))
    return dropped


def load_refit_log(settings: Settings, source: str, fmt: str, engine: Engine) -> InteractionLog:
    """The log a refit fits on: Spark reads the Parquet export (its input in a cluster); the local
    engine reads the topic or any file format."""
    if engine == "local":
        return read_event_log(settings, source, fmt)
    if is_topic_source(source) or fmt != "parquet":
        raise ValueError("--engine spark reads a Parquet log: write one with `streamrec export --to parquet PATH`, "
                         "then `refit --engine spark --from PATH --format parquet`")
    from streamrec.trainer.spark.logs import read_parquet_log

    return read_parquet_log(source)


def load_shown(settings: Settings, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(user ids, item ids, invalid impressions) of every item an impression showed: from serving's
    impressions topic (`topic`) or a file of impressions as JSON lines."""
    if source == "topic":
        records = read_records(settings.kafka_bootstrap, settings.impressions_topic, settings.kafka_client)
        values = [record.value for record in records]
    else:
        try:
            values = [Path(source).read_bytes()]
        except OSError as exc:
            raise ValueError(f"--impressions {source}: {exc.strerror or exc}") from exc
    impressions: list[object] = []
    undecodable = 0
    for value in values:
        try:
            impressions.extend(decode_record(value))
        except orjson.JSONDecodeError:
            undecodable += 1
    users, items, invalid = shown_pairs(impressions)
    return users, items, invalid + undecodable


def rated_events(log: InteractionLog, model_name: str) -> InteractionLog:
    """The rated events, for a model that learns from ratings only: an unrated event (a view, a
    click) entered its fit as a rating of 1, so an item a user had only viewed was predicted at
    one star. A log without ratings is refused, as the rating protocol refuses it."""
    rated = np.flatnonzero(np.isfinite(log.rating))
    if not len(rated):
        raise ValueError(f"{model_name} learns from ratings and this log has none: refit a model that ranks "
                         "from interactions (als, bpr, item-knn, ...)")
    if len(rated) < len(log):
        print(f"note: {len(log) - len(rated)} of {len(log)} events have no rating; {model_name} is fitted on the "
              "rated ones only", file=sys.stderr)
    return log.take(rated)


def refit_once(
    settings: Settings, model_name: str, params: list[str] | tuple[str, ...], source: str, fmt: str,
    out_dir: str | Path | None, do_publish: bool, version: int, engine: Engine = "local",
    impressions: str | None = None, keep_artefacts: int = KEEP_ARTEFACTS,
) -> dict[str, Any]:
    """One refit: load the log from the beginning, fit (on `engine`), write artefacts (the newest
    `keep_artefacts` versions kept), publish.
    Each stage's time goes to `streamrec_refit_duration_seconds`; the caller counts the outcome."""
    cls = model_class(model_name, engine)
    if not issubclass(cls, Recommender):
        raise ValueError(f"{model_name!r} is an online model, not a batch model")
    if impressions is not None and "impression_negatives" not in cls.Params.model_fields:
        raise ValueError(f"--impressions: {model_name} does not learn from impressions (the pointwise networks do, "
                         "with impression_negatives=true)")
    typed = parse_params(cls.Params, params, model_name)
    effective = typed.model_dump()
    if not is_topic_source(source):  # a MovieLens folder's side files, as `evaluate`
        effective = with_side_data(cls, effective, typed.model_fields_set, source, fmt)
    model = cls(**effective)
    with refit_metrics.DURATION.labels(model_name, "load").time():
        log = load_refit_log(settings, source, fmt, engine)
        loaded = len(log)
        if model.capabilities.explicit and not model.capabilities.implicit:
            log = rated_events(log, model_name)
        data = Interactions.from_log(log, implicit=not model.capabilities.explicit)
        if impressions is not None:
            shown_users, shown_items, invalid = load_shown(settings, impressions)
            data = data.with_shown(shown_users, shown_items)
    fit_seconds = fit_with_progress(model, data)
    refit_metrics.DURATION.labels(model_name, "fit").observe(fit_seconds)
    out = Path(out_dir) if out_dir else Path(settings.home) / "refits"
    report: dict[str, Any] = {
        "model": model_name, "version": version, "events": loaded, "events_fitted": len(log), "users": data.n_users,
        "items": data.n_items, "fit_seconds": fit_seconds, "engine": engine, "ranks": world()[1],
        "params": effective,
    }
    if impressions is not None:  # what the fit could use of them: pairs shown and never picked
        report["impressions"] = {"shown_pairs": int(data.shown.nnz), "invalid": invalid}
    if not is_primary():  # another rank of a data-parallel fit (--nproc): rank 0 writes and publishes
        return report
    with refit_metrics.DURATION.labels(model_name, "publish").time():
        export = model.export()
        report["artefacts"] = write_artefacts(model, export, out / model_name / f"v{version:06d}")
        prune_artefacts(out / model_name, keep_artefacts)
        if do_publish:
            with ParamClient.from_settings(settings) as client:
                report["published"] = publish(client, model, version, export)
    published_rows = sum(t["rows"] for t in report.get("published", {}).get("tables", {}).values())
    refit_metrics.INPUT_ROWS.labels(model_name).set(len(log))
    refit_metrics.PUBLISHED_ROWS.labels(model_name).set(published_rows)
    refit_metrics.LAST_SUCCESS.labels(model_name).set(time.time())
    return report


# What a refit of a running loop may fail with and be tried again at the next period: no events in
# the topic yet, the broker or the parameter server unreachable or answering an error.
RETRYABLE = (ValueError, OSError, ParamServerError, KafkaError)


def refit_loop(
    settings: Settings, model_name: str, params: list[str] | tuple[str, ...], source: str, fmt: str,
    period: float | None, out_dir: str | Path | None, do_publish: bool, engine: Engine = "local",
    impressions: str | None = None, keep_artefacts: int = KEEP_ARTEFACTS,
) -> Iterator[dict[str, Any]]:
    """Refit once, or every `period` seconds (measured start to start) until interrupted.

    A loop is a long-running service: it serves its metrics on `settings.metrics_port` (when set)
    and survives a failed refit (reported as `{"model", "version", "error"}` and counted as
    `outcome="failed"`); the next period tries again. A single refit raises instead."""
    version = int(time.time())
    refit_metrics.declare(model_name)
    if period is not None and settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    while True:
        started = time.monotonic()
        try:
            report = refit_once(settings, model_name, params, source, fmt, out_dir, do_publish, version, engine,
                                impressions, keep_artefacts)
        except RETRYABLE as exc:
            refit_metrics.RUNS.labels(model_name, "failed").inc()
            if period is None:
                raise
            report = {"model": model_name, "version": version, "error": f"{type(exc).__name__}: {exc}"}
        else:
            refit_metrics.RUNS.labels(model_name, "ok").inc()
        yield report
        if period is None:
            return
        version += 1
        time.sleep(max(0.0, period - (time.monotonic() - started)))
