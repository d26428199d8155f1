"""`streamrec bench freshness` and `streamrec bench soak`: whole-pipeline benchmarks on a private stack."""

from __future__ import annotations

import click

from streamrec.core.cli import FiniteFloatRange, print_json, settings_from
from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.stream.loaders import FORMATS

MIN_POLL_S = 0.05  # `serve --poll-interval`'s minimum: a shorter poll failed the stack's serving after it started


@click.command("freshness")
@click.option("--data", "data", type=DATA, required=True,
              help="log that seeds the model and, cycled, feeds the replay")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True,
              help="format of a --data PATH (a data-set name brings its own)")
@click.option("--replay-rate", type=FiniteFloatRange(min=0), default=20_000, show_default=True,
              help="events per second replayed while the probe runs (0: no replay)")
@click.option("--replay-seconds", type=FiniteFloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="how long the replay runs")
@click.option("--poll", type=FiniteFloatRange(min=MIN_POLL_S), default=1.0, show_default=True,
              help=f"serving's parameter-server poll, seconds (at least {MIN_POLL_S}, as `serve` requires)")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--spread", type=FiniteFloatRange(min=0), default=20.0, show_default=True,
              help="trials start at random moments within this many seconds of the replay")
@click.option("--timeout", type=FiniteFloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="seconds before a trial counts as not reflected (and counts as this long in the p99)")
@click.option("--client", type=click.Choice(["kafka-python", "confluent"]), help="[settings.kafka_client]")
@click.option("--json", "as_json", is_flag=True, help="(output is always JSON)")
@click.pass_context
def bench_freshness_cmd(ctx: click.Context, data: DataSource, fmt: str, replay_rate: float, replay_seconds: float,
                        poll: float, trials: int, spread: float, timeout: float, client: str | None,
                        as_json: bool) -> None:
    """Freshness probe (p99 with timeouts counted) while a replay runs at --replay-rate. Every
    option and the log are checked before the stack starts."""
    from streamrec.app.freshness import bench_freshness, planned_events
    from streamrec.app.simulate_cli import replay_log

    try:
        planned_events(replay_rate, replay_seconds)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--replay-rate") from exc
    log = replay_log(data, fmt)
    settings = settings_from(ctx)
    if client:
        settings = settings.model_copy(update={"kafka_client": client})
    print_json(bench_freshness(settings, log, replay_rate, replay_seconds, poll, trials, spread, timeout))


@click.command("soak")
@click.option("--events", type=click.IntRange(1), default=2_000_000, show_default=True)
@click.option("--users", type=click.IntRange(1), default=1_000_000, show_default=True, help="users by the last event")
@click.option("--items", type=click.IntRange(1), default=100_000, show_default=True, help="items by the last event")
@click.option("--query-rate", type=FiniteFloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="/recommend per second meanwhile (more than 0)")
@click.option("--poll", type=FiniteFloatRange(min=MIN_POLL_S), default=1.0, show_default=True,
              help=f"serving's parameter-server poll, seconds (at least {MIN_POLL_S}, as `serve` requires)")
@click.option("--max-rows", type=click.IntRange(1), help="the parameter server's row bound per table [its default]")
@click.option("--client", type=click.Choice(["kafka-python", "confluent"]), help="[settings.kafka_client]")
@click.option("--json", "as_json", is_flag=True, help="(output is always JSON)")
@click.pass_context
def bench_soak_cmd(ctx: click.Context, events: int, users: int, items: int, query_rate: float, poll: float,
                   max_rows: int | None, client: str | None, as_json: bool) -> None:
    """Synthetic events with a growing id space through the whole pipeline; RSS of trainer,
    serving and parameter server over time, growth after the warm-up (first 10% of events)."""
    from streamrec.app.soak import SoakOptions, run_soak

    settings = settings_from(ctx)
    if client:
        settings = settings.model_copy(update={"kafka_client": client})
    print_json(run_soak(settings, SoakOptions(events=events, users=users, items=items, query_rate=query_rate,
                                              poll_interval=poll, max_rows=max_rows)))


def register(cli: click.Group, bench: click.Group) -> None:
    bench.add_command(bench_freshness_cmd)
    bench.add_command(bench_soak_cmd)
