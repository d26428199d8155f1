"""`streamrec simulate`: compare experiment arms by replaying a log through the real path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from streamrec.core.cli import print_json, settings_from
from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.stream.loaders import FORMATS

if TYPE_CHECKING:
    from streamrec.stream.loaders import InteractionLog


@click.command("simulate")
@click.option("--data", "data", type=DATA, required=True, help="the log to replay (a path or a data-set name)")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True,
              help="format of a --data PATH (a data-set name brings its own)")
@click.option("--arms", default="online-bpr,popularity", show_default=True,
              help="comma-separated arms: online-bpr (the online trainer's model), popularity (the trending list)")
@click.option("--chunk", "chunk_events", type=click.IntRange(min=1), default=10, show_default=True,
              help="events produced between two barriers; each user of a chunk is asked once before it")
@click.option("--k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="replay only the first N events")
@click.option("--seed", type=int, default=0, show_default=True, help="bootstrap seed")
@click.option("--impression-negatives", type=click.IntRange(min=0), default=0, show_default=True,
              help="online-bpr takes this many of its negatives per positive from what serving showed the user "
                   "and the user did not pick (the trainer reads the impressions topic)")
@click.option("--compare-negatives", is_flag=True,
              help="replay twice, with sampled negatives only and with --impression-negatives, and print the "
                   "online-bpr arm's lift with a paired bootstrap interval")
@click.option("--cold-items", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="withhold this share of the items until the middle of the replay, then replay twice, without "
                   "and with the content tower and exploration, and print the online-bpr arm's hit@k on the new "
                   "items after their release and overall, with paired bootstrap intervals")
@click.option("--catalogue", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="item metadata for --cold-items (u.item, CSV, JSON lines) [default: the data set's u.item]")
@click.option("--explore", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
              help="with --cold-items: the online-bpr arm's share of exploration slots in the second replay")
@click.option("--trainer-seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="replay each configuration this many times, the online learner seeded 0..N-1, and pool every "
                   "replay's queries per user (one learner's trajectory is one draw; N times the run time)")
@click.option("--json", "as_json", is_flag=True, help="(output is always JSON)")
@click.pass_context
def simulate_cmd(ctx: click.Context, data: DataSource, fmt: str, arms: str, chunk_events: int, k: int,
                 limit: int | None, seed: int, impression_negatives: int, compare_negatives: bool,
                 cold_items: float | None, catalogue: Path | None, explore: float, trainer_seeds: int,
                 as_json: bool) -> None:
    """Replay a log through a private broker topic, trainer, parameter server and serving worker
    whose experiment splits users between the arms; each user is asked for k items before their
    next events and a hit is the next item in the list. Prints per-arm hit@k with 95% intervals
    (a bootstrap over users) and the lifts."""
    from streamrec.app.simulate import SimulateOptions, compare_cold_start, compare_impression_negatives, simulate

    if cold_items is not None and catalogue is None:
        beside = data.path / "u.item" if data.path.is_dir() else data.path.parent / "u.item"
        if not beside.exists():
            raise click.UsageError("--cold-items needs item metadata: --catalogue PATH")
        catalogue = beside
    options = SimulateOptions(tuple(a.strip() for a in arms.split(",") if a.strip()), chunk_events, k, limit,
                              seed=seed, impression_negatives=impression_negatives, cold_items=cold_items or 0.0,
                              catalogue=catalogue, explore=explore if cold_items is not None else 0.0,
                              trainer_seeds=trainer_seeds)
    log = replay_log(data, fmt)
    try:
        run = compare_cold_start if cold_items is not None else (
            compare_impression_negatives if compare_negatives else simulate)
        print_json(run(settings_from(ctx), log, options))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def replay_log(data: DataSource, fmt: str) -> InteractionLog:
    """The log to replay, read before any process starts, or a one-line usage error. Events are
    published at their own times, so a log without a timestamp column is refused here, as
    `streamrec replay` refuses it: row positions as times started the stack and failed 11 s later.
    A folder without the file its format names (ml-100k's u.data) is an OSError, not a traceback."""
    from streamrec.stream.loaders import load_log

    fmt = data.format_or(fmt)
    try:
        return load_log(data.path, fmt, require_timestamp=True)
    except (OSError, ValueError, KeyError) as exc:
        raise click.UsageError(f"cannot read {data.path} as {fmt}: {exc}") from exc


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(simulate_cmd)
