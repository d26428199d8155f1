"""`streamrec bench freshness` and `streamrec bench soak`: whole-pipeline benchmarks on a private stack."""

from __future__ import annotations

import click

from streamrec.core.cli import print_json, settings_from
from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.stream.loaders import FORMATS


@click.command("freshness")
@click.option("--data", "data", type=DATA, required=True,
              help="log that seeds the model and, cycled, feeds the replay")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True,
              help="format of a --data PATH (a data-set name brings its own)")
@click.option("--replay-rate", type=float, default=20_000, show_default=True,
              help="events per second replayed while the probe runs (0: no replay)")
@click.option("--replay-seconds", type=float, default=60.0, show_default=True, help="how long the replay runs")
@click.option("--poll", type=float, default=1.0, show_default=True, help="serving's parameter-server poll, seconds")
@click.option("--trials", type=int, default=20, show_default=True)
@click.option("--spread", type=float, default=20.0, show_default=True,
              help="trials start at random moments within this many seconds of the replay")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="seconds before a trial counts as not reflected (and counts as this long in the p99)")
@click.option("--client", type=click.Choice(["kafka-python", "confluent"]), help="[settings.kafka_client]")
@click.option("--json", "as_json", is_flag=True, help="(output is always JSON)")
@click.pass_context
def bench_freshness_cmd(ctx: click.Context, data: DataSource, fmt: str, replay_rate: float, replay_seconds: float,
                        poll: float, trials: int, spread: float, timeout: float, client: str | None,
                        as_json: bool) -> None:
    """Freshness probe (p99 with timeouts counted) while a replay runs at --replay-rate."""
    from streamrec.app.freshness import bench_freshness

    settings = settings_from(ctx)
    if client:
        settings = settings.model_copy(update={"kafka_client": client})
    print_json(bench_freshness(settings, str(data.path), data.format_or(fmt), replay_rate, replay_seconds, poll,
                               trials, spread, timeout))


@click.command("soak")
@click.option("--events", type=click.IntRange(1), default=2_000_000, show_default=True)
@click.option("--users", type=click.IntRange(1), default=1_000_000, show_default=True, help="users by the last event")
@click.option("--items", type=click.IntRange(1), default=100_000, show_default=True, help="items by the last event")
@click.option("--query-rate", type=float, default=20.0, show_default=True, help="/recommend per second meanwhile")
@click.option("--poll", type=float, default=1.0, show_default=True, help="serving's parameter-server poll, seconds")
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
