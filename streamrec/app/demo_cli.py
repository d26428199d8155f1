"""`streamrec demo`: one command that shows the system working, on any machine.

Data, in this order: `--data`, `$STREAMREC_DEMO_DATA` (each a path or a data-set name), MovieLens
100K from the data-set cache, a download of it, else the built-in synthetic log
(`streamrec.stream.synthetic`) with a one-line notice, so a fresh clone offline still runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from streamrec.core.cli import FiniteFloatRange, print_json, settings_from
from streamrec.stream.datasets import cache
from streamrec.stream.datasets.catalogue import DatasetError, dataset
from streamrec.stream.datasets.resolve import resolve_data
from streamrec.stream.loaders import FORMATS

SYNTHETIC = "synthetic"
DEMO_DATASET = "ml-100k"


def _synthetic_log(home: Path) -> tuple[Path, str]:
    """The built-in synthetic log, written as CSV under `home` so it is replayed through the same
    loaders as any file."""
    import pandas as pd

    from streamrec.stream.synthetic import synthetic_log

    log = synthetic_log()
    path = home / "demo" / "synthetic.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user_id": log.user_id, "item_id": log.item_id, "rating": log.rating,
                  "timestamp": log.timestamp}).to_csv(path, index=False)
    return path, "csv"


def demo_data(data: str | None, fmt: str, home: Path) -> tuple[Path, str]:
    """(path, format) of the log to replay: `--data`, `$STREAMREC_DEMO_DATA`, the cached ml-100k,
    a download of it, else the built-in synthetic log (also `--data synthetic`)."""
    chosen = data or os.environ.get("STREAMREC_DEMO_DATA")
    if chosen == SYNTHETIC:
        return _synthetic_log(home)
    if chosen:
        try:
            source = resolve_data(chosen, home)
        except DatasetError as exc:
            raise click.ClickException(f"no demo data at {chosen}: {exc}; or pass --data synthetic") from exc
        return source.path, source.format_or(fmt)
    # imported here: httpx only when the demo needs it
    from streamrec.stream.datasets.store import fetch_dataset

    entry = dataset(DEMO_DATASET)
    try:
        path, downloaded = fetch_dataset(entry, home)  # the cached copy, else a download
    except DatasetError as exc:
        click.echo(f"no --data, no STREAMREC_DEMO_DATA, no {DEMO_DATASET} in {cache.cache_root(home)} and no "
                   f"download ({exc}): running on the built-in synthetic log (planted user and item groups; "
                   "see streamrec/stream/synthetic.py)", err=True)
        return _synthetic_log(home)
    if downloaded:
        click.echo(f"downloaded {DEMO_DATASET} into {path} ({entry.license})", err=True)
    return path, entry.format


@click.command("demo")
@click.option("--data", "data", help="log to replay (a path or a data-set name), or `synthetic` "
              "[$STREAMREC_DEMO_DATA, else ml-100k from the cache or a download, else synthetic]")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k",
              help="format of a PATH (a data-set name brings its own)")
@click.option("--duration", type=float, default=120.0, show_default=True, help="replay the log in about this many seconds")
@click.option("--speed", type=float, help="event-time seconds per wall second (overrides --duration)")
@click.option("--poll-interval", type=float, default=5.0, show_default=True, help="serving poll interval")
@click.option("--refit-every", type=click.IntRange(min=1), default=None,
              help="refit item kNN and ALS every N events [a quarter of the log]")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.pass_context
def demo(ctx: click.Context, data: str | None, fmt: str, duration: float, speed: float | None,
         poll_interval: float, refit_every: int | None, as_json: bool) -> None:
    """Run the whole real-time pipeline on a replayed log: broker, Redis, parameter server, online
    trainer, two serving workers and a refit loop; live display, summary and plots. Stops
    everything it started, also on Ctrl-C."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from streamrec.app import infra
    from streamrec.app.demo import DemoOptions, run_demo, status_rows, summary_rows
    from streamrec.core.config import load_settings, read_infra_state
    from streamrec.core.progress import stderr_console

    root = ctx.find_root().params
    settings = settings_from(ctx)
    data_path, fmt = demo_data(data, fmt, Path(settings.home))
    before = read_infra_state(Path(settings.home)).get("started", {})
    try:
        state = infra.up(settings, root.get("kafka_bootstrap"), root.get("redis_url"))
    except infra.InfraError as exc:
        raise click.ClickException(str(exc)) from exc
    # by process, not name: a dead broker recorded by an earlier run is replaced under the same name
    started_here = {name: proc for name, proc in state["started"].items() if before.get(name) != proc}
    stderr_console.print(f"[bold]broker[/] {state['kafka_bootstrap']} ({state['broker']})  "
                         f"[bold]redis[/] {state['redis_url']} ({state['redis']})")
    settings = load_settings(**root)  # `up` may have just recorded new addresses
    options = DemoOptions(data_path, fmt, duration, speed, poll_interval, refit_every)

    def render(status: dict) -> Table:
        table = Table(title="streamrec demo (Ctrl-C stops everything)", show_header=False)
        for key, value in status_rows(status):
            table.add_row(key, value)
        return table

    try:
        if stderr_console.is_terminal:
            with Live(console=stderr_console, refresh_per_second=4) as live:
                summary = run_demo(settings, options, lambda status: live.update(render(status)))
        else:  # logs, CI: a line every 10 s instead of a redrawn table
            last = [0.0]

            def log_line(status: dict) -> None:
                if time.monotonic() - last[0] >= 10:
                    last[0] = time.monotonic()
                    rows = status_rows(status)
                    stderr_console.print("  ".join(f"{key} {value}" for key, value in [*rows[:6], rows[-1]]))

            summary = run_demo(settings, options, log_line)
    finally:  # leave the machine as we found it
        if started_here:
            infra.down(settings, only=set(started_here))
    if as_json:
        print_json(summary)
        return
    table = Table(title="streamrec demo summary", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths are copied from here: folded, never cut with an ellipsis
    for key, value in summary_rows(summary):
        table.add_row(key, value)
    Console().print(table)


@click.group()
def probe() -> None:
    """Probes against running processes."""


@probe.command("freshness")
@click.option("--url", default=None, help="serving base URL [http://127.0.0.1:<settings.serving_port>]")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--burst", type=click.IntRange(min=1), default=20, show_default=True, help="interactions per trial")
@click.option("--min-hits", type=click.IntRange(1, 10), default=3, show_default=True,
              help="cluster items in the top 10 that count")
@click.option("--spread", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="start trials at random moments within this many seconds (use the poll interval)")
@click.option("--timeout", type=FiniteFloatRange(min=0, min_open=True), default=180.0, show_default=True,
              help="seconds before a trial fails")
@click.option("--table", default="bpr_items", show_default=True, help="item table the clusters come from")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def probe_freshness_cmd(ctx: click.Context, url: str | None, trials: int, burst: int, min_hits: int, spread: float,
                        timeout: float, table: str, as_json: bool) -> None:
    """Time from a burst of interactions of a new user to recommendations that reflect them."""
    from streamrec.app.probe import probe_freshness

    settings = settings_from(ctx)
    try:
        result = probe_freshness(settings, url or f"http://127.0.0.1:{settings.serving_port}", trials, burst, min_hits,
                                 table=table, timeout_s=timeout, spread_s=spread)
    except (ValueError, OSError) as exc:  # a model too small to probe, a server that does not answer
        raise click.ClickException(f"probe failed: {exc}") from exc
    if as_json:
        print_json(result)
    else:
        click.echo(f"freshness over {result['reflected']}/{trials} trials: p50 {result['p50_seconds']} s, "
                   f"p99 {result['p99_seconds']} s ({result['timeouts']} timed out)")


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(demo)
    cli.add_command(probe)
