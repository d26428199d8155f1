"""`streamrec demo`: one command that shows the system working on MovieLens 100K."""

from __future__ import annotations

import os
from pathlib import Path

import click

from streamrec.cli import print_json, settings_from

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_demo_data() -> Path:
    """$STREAMREC_DEMO_DATA, else the shared MovieLens 100K beside the checkout."""
    return Path(os.environ.get("STREAMREC_DEMO_DATA", REPO_ROOT.parent / "shared" / "data" / "ml-100k"))


@click.command("demo")
@click.option("--data", "data_path", type=click.Path(path_type=Path), help="log to replay [MovieLens 100K]")
@click.option("--format", "fmt", type=click.Choice(["ml-100k", "ml-latest", "csv", "jsonl"]), default="ml-100k")
@click.option("--speed", type=float, default=0.0, show_default=True, help="event-time compression; 0 = max")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.pass_context
def demo(ctx: click.Context, data_path: Path | None, fmt: str, speed: float, as_json: bool) -> None:
    """Start the local infrastructure and replay a log into it, with progress and a summary."""
    from stream import infra
    from stream.loaders import load_log
    from stream.publish import EventPublisher
    from stream.replay import replay
    from stream.topics import create_topics, describe_topic
    from streamrec.config import load_settings
    from streamrec.progress import progress_bar, stderr_console

    data_path = data_path or default_demo_data()
    if not data_path.exists():
        raise click.ClickException(
            f"no demo data at {data_path}: pass --data (MovieLens 100K folder) or set STREAMREC_DEMO_DATA"
        )
    settings = settings_from(ctx)
    root = ctx.find_root().params
    try:
        state = infra.up(settings, root.get("kafka_bootstrap"), root.get("redis_url"))
    except infra.InfraError as exc:
        raise click.ClickException(str(exc)) from exc
    stderr_console.print(f"[bold]broker[/] {state['kafka_bootstrap']} ({state['broker']})  "
                         f"[bold]redis[/] {state['redis_url']} ({state['redis']})")
    settings = load_settings(**root)  # again: `up` may have just recorded new addresses
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], settings.topic_partitions)
    log = load_log(data_path, fmt)
    publisher = EventPublisher.from_settings(settings, "demo")
    with progress_bar(f"replay {data_path.name} -> {settings.topic}", len(log), enabled=not as_json or None) as advance:
        result = replay(log, publisher, speed, progress=advance)
    publisher.close()
    topic = describe_topic(settings.kafka_bootstrap, settings.topic)
    summary = {**result.to_json(), "topic": settings.topic, "topic_messages": topic["messages"],
               "kafka_bootstrap": settings.kafka_bootstrap, "redis_url": state["redis_url"], "note": state["note"]}
    if as_json:
        print_json(summary)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="streamrec demo", show_header=False)
    for key, value in summary.items():
        if value is not None:
            table.add_row(key, str(value))
    Console().print(table)
    stderr_console.print("Stop the local infrastructure with: streamrec infra down")


@click.group()
def probe() -> None:
    """Probes against running processes."""


@probe.command("freshness")
@click.option("--url", default=None, help="serving base URL [http://127.0.0.1:<settings.serving_port>]")
@click.option("--trials", type=int, default=20, show_default=True)
@click.option("--burst", type=int, default=20, show_default=True, help="interactions per trial")
@click.option("--min-hits", type=int, default=3, show_default=True, help="cluster items in the top 10 that count")
@click.option("--spread", type=float, default=0.0, show_default=True,
              help="start trials at random moments within this many seconds (use the poll interval)")
@click.option("--timeout", type=float, default=180.0, show_default=True, help="seconds before a trial fails")
@click.option("--table", default="bpr_items", show_default=True, help="item table the clusters come from")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def probe_freshness_cmd(ctx: click.Context, url: str | None, trials: int, burst: int, min_hits: int, spread: float,
                        timeout: float, table: str, as_json: bool) -> None:
    """Time from a burst of interactions of a new user to recommendations that reflect them."""
    from streamrec.probe import probe_freshness

    settings = settings_from(ctx)
    result = probe_freshness(settings, url or f"http://127.0.0.1:{settings.serving_port}", trials, burst, min_hits,
                             table=table, timeout_s=timeout, spread_s=spread)
    if as_json:
        print_json(result)
    else:
        click.echo(f"freshness over {result['reflected']}/{trials} trials: p50 {result['p50_seconds']} s, "
                   f"p99 {result['p99_seconds']} s ({result['timeouts']} timed out)")


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(demo)
    cli.add_command(probe)
