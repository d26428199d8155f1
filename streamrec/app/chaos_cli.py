"""`streamrec chaos`: the pipeline under seeded faults; one JSON report (docs/operations.md,
"Delivery guarantees")."""

from __future__ import annotations

from pathlib import Path

import click

from streamrec.core.cli import print_json, settings_from
from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.stream.loaders import FORMATS


@click.command("chaos")
@click.option("--data", "data", type=DATA, required=True,
              help="log to replay: a file or folder, or a data-set name like ml-100k")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True,
              help="format of a PATH (a data-set name brings its own)")
@click.option("--seed", type=int, default=0, show_default=True, help="seeds the fault schedule and the query load")
@click.option("--events", type=click.IntRange(min=1), help="replay only the first N events of the log")
@click.option("--rate", type=click.FloatRange(min=1), default=500.0, show_default=True,
              help="replay pace: events per second on average")
@click.option("--shards", type=click.IntRange(1, 8), default=1, show_default=True, help="parameter-server shards")
@click.option("--partitions", type=click.IntRange(min=2), default=4, show_default=True, help="partitions of the run's topic")
@click.option("--query-rate", type=click.FloatRange(min=1), default=20.0, show_default=True,
              help="/recommend requests per second during the replay")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="logs and checkpoints [<home>/chaos/<run>]")
@click.option("--no-clean-run", is_flag=True, help="skip the second, fault-free run (no hr@10 comparison)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (the only output form)")
@click.pass_context
def chaos(ctx: click.Context, data: DataSource, fmt: str, seed: int, events: int | None, rate: float, shards: int,
          partitions: int, query_rate: float, out_dir: Path | None, no_clean_run: bool, as_json: bool) -> None:
    """Replay a log through the whole pipeline (two trainers, checkpointing parameter server,
    two serving workers under load, its own Redis) while killing trainers, parameter-server shards,
    Redis and serving workers at seeded moments; report lost and duplicated events per store, the
    recovery times, serving failures and hr@10 next to a fault-free run. The broker comes from the
    settings; when none answers there, an embedded one is started for the run."""
    from streamrec.app import infra
    from streamrec.app.chaos import ChaosOptions, run_chaos
    from streamrec.app.chaos_cluster import ClusterShape
    from streamrec.core.net import host_port, port_open

    settings = settings_from(ctx)
    broker = None
    if not port_open(*host_port(settings.kafka_bootstrap)):
        broker = infra.start_broker(Path(settings.home))
        settings = settings.model_copy(update={"kafka_bootstrap": f"{broker.host}:{broker.port}"})
    options = ChaosOptions(data.path, data.format_or(fmt), seed, events, rate, ClusterShape(shards=shards), partitions, query_rate,
                           clean_run=not no_clean_run, out_dir=out_dir)
    try:
        report = run_chaos(settings, options)
    finally:
        if broker is not None:
            infra.stop(broker.to_json())
    print_json(report)


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(chaos)
