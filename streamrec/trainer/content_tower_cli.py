"""`streamrec content-tower fit`: fit the cold-start content tower and seed new items' rows.

One round (`streamrec.trainer.content_tower.refresh_content_tower`) reads the published catalogue
and the online table's rows, fits the tower, publishes it as `content_tower/<table>` and gives the
catalogue items without a row their predicted rows. `--every` repeats it as a service beside the
online trainer; a failed round (no catalogue yet, parameter server unreachable) is reported and the
next period tries again, like `streamrec refit --every`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click
import numpy as np
from redis import RedisError
from redis.exceptions import RedisClusterException

from streamrec.core.cli import settings_from, show
from streamrec.core.config import Settings, masked_url
from streamrec.param_server.client import ParamClient, ParamServerError
from streamrec.trainer.content_tower import refresh_content_tower, seed_with_published
from streamrec.trainer.online.exploration import NO_CLOCK, ExplorationStore
from streamrec.trainer.refit import parse_loop_period

# What a round may fail with and be tried again at the next period: no catalogue or too few
# trained items yet (ValueError, CatalogueError among them), the parameter server unreachable or
# answering an error, the feature store's Redis unreachable (redis-py's RedisClusterException, a
# cluster that cannot be reached, is no RedisError), a feature matrix too large for memory (the
# allocation fails before anything is changed, and the next catalogue may be smaller).
REDIS_FAILURES = (RedisError, RedisClusterException)
ROUND_FAILURES = (ValueError, OSError, ParamServerError, *REDIS_FAILURES, MemoryError)


@click.group("content-tower")
def content_tower_group() -> None:
    """Cold start: item metadata -> embedding rows for items without interactions."""


def mark_fresh(settings: Settings) -> Callable[[np.ndarray], None]:
    """Seeded items become fresh for serving's exploration slots from now (first seen at the
    trainer's event clock, in the feature store's Redis), before any interaction: with rows from
    the tower they can be served, and exploration gives them impressions. The store is made at the
    first mark, where a failure is the round's: a Redis Cluster client connects as it is built, and
    built here, with the cluster down, it stopped `--every` before its first round."""
    store: ExplorationStore | None = None

    def mark(ids: np.ndarray) -> None:
        nonlocal store
        if store is None:
            store = ExplorationStore.from_url(settings.redis_url, settings.feature_prefix, settings.redis_cluster)
        clock = store.clock()
        if clock == NO_CLOCK:  # nothing counted yet: their age starts at the first event counted
            return
        zeros = np.zeros(len(ids), np.int64)
        store.count(np.asarray(ids, object), zeros, np.full(len(ids), clock), NO_CLOCK)

    return mark


def _failed_at(settings: Settings, exc: BaseException) -> str:
    """What a failed round's message starts with: the component that failed, by the exception's
    type (every failure but a ValueError used to be blamed on the parameter server, Redis's too)."""
    if isinstance(exc, REDIS_FAILURES):
        return f"feature store Redis {masked_url(settings.redis_url)}: "
    if isinstance(exc, MemoryError):
        return "out of memory fitting the tower: "
    if isinstance(exc, (ParamServerError, OSError)):
        return f"parameter server {','.join(settings.param_servers)}: "
    return ""


def _round(settings: Settings, table: str, min_events: int, explore: bool) -> dict[str, Any]:
    with ParamClient.from_settings(settings) as client:
        return refresh_content_tower(client, table, min_events, mark_fresh(settings) if explore else None)


def _seed(settings: Settings, table: str, since: int, explore: bool) -> dict[str, Any] | None:
    with ParamClient.from_settings(settings) as client:
        return seed_with_published(client, table, since, mark_fresh(settings) if explore else None)


def _seed_until(settings: Settings, table: str, since: int, explore: bool, period: float, until: float,
                as_json: bool) -> None:
    """Between two fits, every `period` seconds: seed the items a new catalogue version added."""
    while time.monotonic() + period < until:
        time.sleep(period)
        try:
            report = _seed(settings, table, since, explore)
        except ROUND_FAILURES as exc:
            show({"table": table, "error": f"seeding: {_failed_at(settings, exc)}{type(exc).__name__}: {exc}"}, as_json)
            continue
        if report is not None:
            since = report["catalogue_version"]
            show(report, as_json)


@content_tower_group.command("fit")
@click.option("--table", default="bpr_items", show_default=True, help="online item table: targets and seeded rows")
@click.option("--min-events", type=click.IntRange(min=0), default=5, show_default=True,
              help="items with fewer events are not fitted on (their rows are mostly noise)")
@click.option("--every", "period", default=None, metavar="PERIOD",
              help="repeat every PERIOD (e.g. 10m) until interrupted; a failed round is reported, not fatal")
@click.option("--seed-every", "seed_period", default=None, metavar="PERIOD",
              help="with --every: between fits, seed the items each new catalogue version adds (the items topic) "
                   "with the tower already published, checked every PERIOD (e.g. 5s)")
@click.option("--explore/--no-explore", default=True, show_default=True,
              help="make seeded items fresh for serving's exploration slots (Redis; see train-online --explore)")
@click.option("--json", "as_json", is_flag=True, help="print JSON (one document per round)")
@click.pass_context
def fit_cmd(ctx: click.Context, table: str, min_events: int, period: str | None, seed_period: str | None,
            explore: bool, as_json: bool) -> None:
    """Fit the tower on TABLE's rows and the published catalogue, publish it, seed new items."""
    settings = settings_from(ctx)
    try:
        seconds = None if period is None else parse_loop_period(period)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--every") from exc
    try:
        seed_seconds = None if seed_period is None else parse_loop_period(seed_period)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--seed-every") from exc
    if seed_seconds is not None and seconds is None:
        raise click.BadParameter("needs --every (seeding runs between fits)", param_hint="--seed-every")
    while True:
        started = time.monotonic()
        try:
            report = _round(settings, table, min_events, explore)
        except ROUND_FAILURES as exc:
            where = _failed_at(settings, exc)
            if seconds is None:
                raise click.ClickException(f"{where}{exc}") from exc
            report = {"table": table, "error": f"{where}{type(exc).__name__}: {exc}"}
        show(report, as_json)
        if seconds is None:
            return
        if seed_seconds:
            _seed_until(settings, table, int(report.get("catalogue_version", 0)), explore, seed_seconds,
                        started + seconds, as_json)
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(content_tower_group)
