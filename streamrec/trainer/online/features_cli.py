"""`streamrec features rebuild`: refill the Redis feature store from the topic by hand (the trainer
does the same by itself when it finds the store wiped). `streamrec features slices`: what the
context slices hold and whether serving uses them."""

from __future__ import annotations

import logging
import time

import click

from streamrec.core.cli import print_json, settings_from, show
from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.stream.loaders import FORMATS


@click.group("features")
def features() -> None:
    """The online trainer's Redis feature store."""


@features.command("rebuild")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.pass_context
def rebuild(ctx: click.Context, as_json: bool) -> None:
    """Write the topic's events into the feature store up to where the parameter server stands
    (the minimum of its shards' watermarks per partition). Idempotent: events the store already
    holds are skipped, so it is safe to run again, or while the trainer runs."""
    from streamrec.param_server.client import ParamClient
    from streamrec.trainer.online.feature_rebuild import (
        rebuild_features,
        server_watermarks,
    )
    from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_from(ctx)
    with ParamClient.from_settings(settings) as client:
        until = server_watermarks(client)
    store = FeatureStore.from_url(settings.redis_url, FeatureStoreConfig.from_settings(settings))
    started = time.perf_counter()
    written = rebuild_features(settings, store, until)
    show({"events": written, "until": until, "watermarks": store.watermarks(),
          "seconds": round(time.perf_counter() - started, 3)}, as_json)


@features.command("slices")
@click.option("--top", type=click.IntRange(1, 1000), default=5, show_default=True, help="items shown per slice")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.pass_context
def slices(ctx: click.Context, top: int, as_json: bool) -> None:
    """The context slices new users are served from (`train-online --explore` counts them): each
    kind's prequential merit (hit rate of its slices' top 10 against the global top 10's, and
    whether serving uses it) and each slice's events and most popular items."""
    from streamrec.trainer.online.context_slices import MERIT_TOP
    from streamrec.trainer.online.exploration import ExplorationStore

    settings = settings_from(ctx)
    tops = ExplorationStore.from_url(settings.redis_url, settings.feature_prefix, settings.redis_cluster) \
        .slice_tops(top)
    merit = {kind: {"events": m.events, f"hit@{MERIT_TOP}": round(m.hits / max(m.events, 1), 4),
                    f"reference_hit@{MERIT_TOP}": round(m.reference_hits / max(m.events, 1), 4),
                    "used": m.useful()} for kind, m in sorted(tops.merit.items())}
    show({"merit": merit, "slices": {name: {"events": tops.events.get(name, 0), "top": ids.tolist()}
                                     for name, (ids, _) in tops.lists.items()}}, as_json)


@click.command("features")
@click.option("--events", type=int, default=100_000, show_default=True)
@click.option("--batch-events", type=click.IntRange(1), default=1000, show_default=True,
              help="events per write (the trainer's batch)")
@click.option("--data", "data", type=DATA,
              help="write this log (a path, or a data-set name) instead of synthetic events")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True,
              help="format of a --data PATH (a data-set name brings its own)")
@click.option("--json", "as_json", is_flag=True, help="(output is always JSON)")
@click.pass_context
def bench_features(ctx: click.Context, events: int, batch_events: int, data: DataSource | None, fmt: str,
                   as_json: bool) -> None:
    """The feature store's writes alone (the Redis or Redis Cluster of the settings): events/s and
    CPU per event of this client and of Redis, on a fresh key prefix removed afterwards."""
    from streamrec.trainer.online.feature_bench import run_feature_bench

    settings = settings_from(ctx)
    data_path = None if data is None else str(data.path)
    fmt = fmt if data is None else data.format_or(fmt)
    print_json(run_feature_bench(settings, data_path, fmt, events, batch_events))


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(features)
    bench.add_command(bench_features)
