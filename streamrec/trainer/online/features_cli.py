"""`streamrec features rebuild`: refill the Redis feature store from the topic by hand (the trainer
does the same by itself when it finds the store wiped)."""

from __future__ import annotations

import logging
import time

import click

from streamrec.core.cli import settings_from, show


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


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(features)
