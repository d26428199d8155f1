"""`streamrec serve` and `streamrec bench serving` (heavy imports stay inside the commands)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from streamrec.core.cli import FiniteFloatRange

if TYPE_CHECKING:
    from streamrec.core.config import Settings
    from streamrec.serving.config import ServingConfig
    from streamrec.stream.kafka import Record


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(serve_cmd)
    cli.add_command(experiments_group)
    bench.add_command(bench_serving_cmd)


@click.group("experiments")
def experiments_group() -> None:
    """Online experiments: serving assigns arms (serve --experiments); these commands read the outcome."""


@experiments_group.command("report")
@click.option("--experiments", "experiments_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="the experiments file, for the arms' weights (sample-ratio check) "
                                 "[settings.experiments_file]")
@click.option("--experiment", "only", default=None, help="the experiment at the top level [the first seen]")
@click.option("--window", default="30m", show_default=True,
              help="a hit: the user's next events within this long (more than 0)")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True,
              help="the answer length the clients asked for: names the hit rate (hit@K)")
@click.option("--seed", type=int, default=0, show_default=True, help="bootstrap seed")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output form)")
@click.pass_context
def report_cmd(ctx: click.Context, experiments_file: Path | None, only: str | None, window: str, k: int, seed: int,
               as_json: bool) -> None:
    """Per-arm hit@k, CTR and coverage with 95% intervals (a bootstrap over users), the relative lift
    against the first arm and a sample-ratio check, from the impressions and interaction topics."""
    from streamrec.core.cli import print_json, settings_from
    from streamrec.serving.experiment_report import build_report
    from streamrec.serving.experiments import Experiments

    settings = settings_from(ctx)
    window_s = report_window(window)
    path = experiments_file or settings.experiments_file
    try:
        experiments = Experiments.parse(path.read_text(encoding="utf-8"), str(path)) if path else None
        impressions = read_topic(settings, settings.impressions_topic,
                                 "serving logs impressions to it when it runs with impressions on "
                                 "(STREAMREC_IMPRESSIONS=on, or auto with an experiments file)")
        events = read_topic(settings, settings.topic, "it is the interaction topic (STREAMREC_TOPIC), which "
                                                      "`streamrec topics create` or the first events create")
        report = build_report(impressions, events, window_s, experiments, only, seed, k=k)
    except (OSError, ValueError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from exc
    print_json(report)


def report_window(text: str) -> float:
    """`--window` in seconds, more than 0: a window of 0 counted every hit as 0 and printed that as
    a result."""
    from streamrec.trainer.refit import parse_period

    try:
        seconds = parse_period(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--window") from exc
    if seconds <= 0:
        raise click.BadParameter(f"{text.strip()!r} is no time: a hit needs a window of more than 0s",
                                 param_hint="--window")
    return seconds


def read_topic(settings: Settings, topic: str, what: str) -> list[Record]:
    """Every record of `topic`; a topic the broker does not have is a one-line error saying what
    writes it (it was a KeyError traceback)."""
    from streamrec.stream.reader import read_records

    try:
        return read_records(settings.kafka_bootstrap, topic, settings.kafka_client)
    except KeyError as exc:
        raise click.ClickException(f"topic {topic!r} does not exist: {what}") from exc


@experiments_group.command("watch")
@click.option("--window", default="30m", show_default=True, help="a hit: the user's next events within this long")
@click.option("--lateness", default="60s", show_default=True,
              help="how far behind the newest timestamp a record may arrive and still be joined")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Prometheus port [settings.metrics_port]")
@click.option("--from-beginning", is_flag=True, help="read both topics from their beginnings (else from their ends)")
@click.pass_context
def watch_cmd(ctx: click.Context, window: str, lateness: str, metrics_port: int | None, from_beginning: bool) -> None:
    """Serve live per-arm impressions, hits, clicks and shown items as Prometheus series (CTR and
    hit@k are their ratios) until SIGTERM; the same join as `experiments report`."""
    import signal
    import threading

    from streamrec.core.cli import settings_from
    from streamrec.serving.experiment_watch import watch
    from streamrec.trainer.refit import parse_period

    settings = settings_from(ctx)
    port = metrics_port or settings.metrics_port
    if not port:
        raise click.UsageError("give --metrics-port (or STREAMREC_METRICS_PORT): the series are the output")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        watch(settings, report_window(window), parse_period(lateness), stop, port, from_beginning)
    except (OSError, ValueError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("serve")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="worker processes")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=None, help="HTTP port [default: settings serving_port]")
@click.option("--poll-interval", type=click.FloatRange(min=0.05), default=None,
              help="seconds between parameter-server polls [default: settings poll_interval]")
@click.option("--user-table", default=None, help="user vectors table [default: bpr_users]")
@click.option("--item-table", default=None, help="item vectors table, the retrieval index [default: bpr_items]")
@click.option("--feature-prefix", default=None, help="Redis feature-store key prefix [default: sr]")
@click.option("--index", type=click.Choice(["auto", "flat", "ivf"]), default=None, help="FAISS index kind")
@click.option("--user-cache-size", type=click.IntRange(min=1), default=None,
              help="users whose rows a worker keeps, least recently used evicted [default: 100000]")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="IVF lists probed per query")
@click.option("--search-memo-mb", type=click.FloatRange(min=0), default=None,
              help="bound on the single-query index answers a worker's buffer keeps, emptied by every index change "
                   "(0: off) [default: 8]")
@click.option("--max-body-bytes", type=click.IntRange(min=0), default=None,
              help="request body cap of every route without its own [default: 65536]")
@click.option("--body-limit", "body_limits", multiple=True, metavar="PATH=BYTES",
              help="request body cap of one route, e.g. /rescore=4194304 (repeatable) [default: /rescore=4 MiB]")
@click.option("--body-read-timeout", "body_read_timeout_s", type=click.FloatRange(min=0.001), default=None,
              help="answer 408 when no part of a request body arrives for this many seconds (a client that "
                   "declares more than it sends held a connection for ever) [default: 30]")
@click.option("--first-poll-wait", "first_poll_wait_s", type=click.FloatRange(min=0), default=None,
              help="seconds a starting worker waits for a model before it accepts requests anyway (0: a "
                   "gateway for POST /events without a parameter server) [default: 15]")
@click.option("--item-catalogue", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="item titles and genres for the console (MovieLens u.item, or item_id,title,genres CSV)")
@click.option("--experiments", "experiments_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="online experiments (YAML; re-read when it changes) [env STREAMREC_EXPERIMENTS_FILE]")
@click.option("--trending-cache", "trending_cache_s", type=click.FloatRange(min=0), default=None,
              help="seconds a worker reuses the trending list (0: read it for every request) [default: 1]")
@click.option("--user-pull-timeout", "user_pull_timeout_s", type=click.FloatRange(min=0.001), default=None,
              help="longest wait for a user's row missing from the worker's cache; past it the user is served "
                   "as unknown (degraded) [default: 0.1]")
@click.option("--redis-timeout", "redis_timeout_s", type=click.FloatRange(min=0.001), default=None,
              help="longest wait for a feature-store read; past it the request is served without history "
                   "(degraded) [default: 0.1]")
@click.option("--impressions-flush", "impressions_flush_s", type=click.FloatRange(min=0.001), default=None,
              help="seconds between a worker's sends of its queued impressions [default: 0.2]")
@click.option("--explore-refresh", "explore_refresh_s", type=click.FloatRange(min=0.001), default=None,
              help="seconds between a worker's reads of the fresh items' counts [default: 1]")
@click.option("--explore-seed", type=int, default=None,
              help="seed of the exploration draws (one worker answering requests in a fixed order then draws "
                   "the same slots: the simulator) [default: unseeded]")
@click.option("--fold-in-events", type=click.IntRange(min=0), default=None,
              help="a user without a row is served from the mean vector of up to this many of their recent "
                   "items (0: off) [default: 5]")
@click.option("--fold-in-weight", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="scale of that mean vector against the items' biases (streamrec study-cold-users) [default: 2]")
@click.option("--session-weight", type=click.FloatRange(min=0.0), default=None,
              help="weight of a user's current session (mean item vector) added to their row, faded by their "
                   "events: the online BPR's own session_weight; 0 when the served model scores without one "
                   "[default: 4]")
@click.option("--user-pull-on-events/--no-user-pull-on-events", "user_pull_on_events", default=None,
              help="pull a cached user's row again when the feature store counts new events of theirs "
                   "(read-your-writes) [default: on]")
@click.option("--context-slices/--no-context-slices", default=None,
              help="serve a user without events from the popularity slices of the request's device and hour, "
                   "where the trainer's merit shows they beat the trending list [default: on]")
@click.option("--log-level", default="warning", show_default=True)
@click.pass_context
def serve_cmd(ctx: click.Context, workers: int, host: str, port: int | None, poll_interval: float | None,
              body_limits: tuple[str, ...], log_level: str, **overrides: object) -> None:
    """Serving workers: poll the parameter server, answer /recommend, /rescore, /similar over HTTP.
    With STREAMREC_API_TOKEN set, every route but /healthz, /readyz and /metrics needs
    `Authorization: Bearer <token>`."""
    from streamrec.core.allocator import tune_allocator
    from streamrec.core.cli import settings_from
    from streamrec.serving.config import DEFAULT_ROUTE_BODY_LIMITS, ServingConfig
    from streamrec.serving.server import run_workers

    tune_allocator()  # also for the workers, which are spawned with this process's environment
    settings = settings_from(ctx)
    routes = {**DEFAULT_ROUTE_BODY_LIMITS, **parse_body_limits(body_limits)}
    try:
        config = ServingConfig.from_settings(settings, poll_interval=poll_interval, route_body_limits=routes,
                                             **overrides)
    except ValueError as exc:  # pydantic's ValidationError: a malformed rule, an impossible setting
        raise click.UsageError(str(exc)) from exc
    if config.experiments_file is not None:  # a broken file at start is an error; later, the last good one stays
        from streamrec.serving.experiments import Experiments

        try:
            Experiments.parse(config.experiments_file.read_text(encoding="utf-8"), str(config.experiments_file))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise click.UsageError(f"--experiments: {exc}") from exc
    if config.item_catalogue is not None:  # each worker reads it at start: a bad one would fail them in a loop
        from streamrec.serving.console.catalogue import Catalogue

        try:
            Catalogue.load(config.item_catalogue)
        except (OSError, ValueError) as exc:
            raise click.UsageError(f"--item-catalogue: {exc}") from exc
    warning = open_api_warning(config, host)
    if warning:
        click.echo(warning, err=True)
    run_workers(config, host, settings.serving_port if port is None else port, workers, log_level)


def open_api_warning(config: ServingConfig, host: str) -> str | None:
    """One line on stderr at start when every route is open to whoever reaches `host`: no
    STREAMREC_API_TOKEN, or an empty one (a secret store that handed over nothing)."""
    if config.api_token is not None:
        return None
    return (f"warning: no STREAMREC_API_TOKEN (unset or empty): every route of the HTTP API on {host} is open, "
            "users' histories included; set one to require `Authorization: Bearer <token>`")


def parse_body_limits(pairs: tuple[str, ...]) -> dict[str, int]:
    """`/rescore=4194304` -> {"/rescore": 4194304}."""
    limits: dict[str, int] = {}
    for pair in pairs:
        path, _, size = pair.partition("=")
        if not path.startswith("/") or not size.isdigit():
            raise click.BadParameter(f"{pair!r}: expected PATH=BYTES, e.g. /rescore=4194304", param_hint="--body-limit")
        limits[path] = int(size)
    return limits


@click.command("serving")
@click.option("--items", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--users", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option("--dim", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--max-connections", "--concurrency", "max_connections", type=click.IntRange(min=1), default=256,
              show_default=True, help="cap of the generator's connection pool; a slot finding it full is `dropped`")
@click.option("--rate", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="open-loop arrival rate, requests/s (0: sweep for the saturation rate)")
@click.option("--duration", type=FiniteFloatRange(min=1), default=20.0, show_default=True,
              help="seconds of load at --rate (a sweep uses 5 s steps)")
@click.option("--k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--index", type=click.Choice(["auto", "flat", "ivf"]), default="auto", show_default=True)
@click.option("--auth-run/--no-auth-run", default=True, show_default=True,
              help="also measure with the API token and the seen-item filter on")
@click.option("--filter-rate", type=FiniteFloatRange(min=0), default=500.0, show_default=True,
              help="also measure at this rate with a catalogue filter on (include=genre:g3, ~5% of items); 0: not")
@click.option("--json", "as_json", is_flag=True, help="print JSON (the only output form)")
@click.pass_context
def bench_serving_cmd(ctx: click.Context, as_json: bool, **options: object) -> None:
    """Random vectors in a private parameter server, N workers, an open-loop load generator; beside
    it the same load on an empty endpoint of the same stack, and FAISS search alone."""
    from streamrec.core.cli import print_json, settings_from
    from streamrec.serving.bench import BenchFailure, run_bench

    try:
        result = run_bench(settings_from(ctx), **options)
    except BenchFailure as exc:  # a process that did not start, a failed load generator: its stderr says why
        raise click.ClickException(str(exc)) from exc
    print_json(result)
