"""`streamrec train-online` and `streamrec bench pipeline`."""

from __future__ import annotations

import logging
import signal

import click

from streamrec.core.cli import print_json, settings_from
from streamrec.core.params import ParamError, parse_params
from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.stream.loaders import FORMATS
from streamrec.trainer.registry import model_class, names

DEFAULT_MODELS = ("online-bpr", "online-mf")


def split_model_params(models: tuple[str, ...], pairs: tuple[str, ...]) -> dict[str, list[str]]:
    """`online-bpr.dim=64` -> {"online-bpr": ["dim=64"]}: each model's `KEY=VALUE` pairs."""
    per_model: dict[str, list[str]] = {m: [] for m in models}
    for pair in pairs:
        model, dot, rest = pair.partition(".")
        if not dot or model not in per_model:
            raise click.BadParameter(f"{pair!r}: expected MODEL.KEY=VALUE with MODEL one of {list(models)}",
                                     param_hint="--param")
        per_model[model].append(rest)
    return per_model


@click.command("train-online")
@click.option("--model", "models", multiple=True, type=click.Choice(names("streamrec.trainer.online")),
              help="online models to train (default: online-bpr and online-mf; the first ranks items)")
@click.option("--param", "pairs", multiple=True, help="MODEL.KEY=VALUE, e.g. online-bpr.dim=64")
@click.option("--batch-events", type=int, default=5000, show_default=True, help="most records per consumed batch")
@click.option("--batch-seconds", type=float, default=0.5, show_default=True, help="most wait for a batch to fill")
@click.option("--evaluate-every", type=int, default=10, show_default=True, help="prequential sample: every Nth event")
@click.option("--max-events", type=int, help="stop after this many records")
@click.option("--idle-exit", type=float,
              help="stop after this many seconds without records, counted once it holds partitions "
                   "(or 15 s after start without any)")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="JSON report file, rewritten every 5 s")
@click.option("--metrics-port", type=int, help="Prometheus port [settings.metrics_port]")
@click.option("--no-feature-store", is_flag=True, help="do not write the Redis feature store")
@click.option("--warmup-events", type=click.IntRange(min=0), default=300_000, show_default=True,
              help="earlier records re-read (not learned) on start, over all partitions: histories and sessions")
@click.option("--explore", is_flag=True,
              help="count impressions, clicks and first sightings per item into Redis for serving's exploration "
                   "slots (STREAMREC_EXPLORE_SHARE / an arm's explore)")
@click.option("--json", "as_json", is_flag=True, help="print the final report as JSON")
@click.pass_context
def train_online(ctx: click.Context, models: tuple[str, ...], pairs: tuple[str, ...], batch_events: int,
                 batch_seconds: float, evaluate_every: int, max_events: int | None,
                 idle_exit: float | None, report_path: str | None, metrics_port: int | None,
                 no_feature_store: bool, warmup_events: int, explore: bool, as_json: bool) -> None:
    """Consume the interaction topic and train the online models into the parameter server."""
    from prometheus_client import start_http_server
    from threadpoolctl import threadpool_limits

    from streamrec.core.allocator import tune_allocator
    from streamrec.param_server.client import ParamClient
    from streamrec.stream.topics import create_topics
    from streamrec.trainer.online.exploration import ExplorationConfig, ExplorationStore
    from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
    from streamrec.trainer.online.trainer import OnlineTrainer, StateOfAnotherLog, TrainerConfig

    tune_allocator()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_from(ctx)
    models = models or DEFAULT_MODELS
    per_model = split_model_params(models, pairs)
    try:
        hyper = {name: parse_params(model_class(name).Params, per_model[name], name).model_dump() for name in models}
    except ParamError as exc:
        raise click.BadParameter(str(exc), param_hint="--param") from None
    port = settings.metrics_port if metrics_port is None else metrics_port
    if port:
        start_http_server(port, addr=settings.metrics_host)
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], settings.topic_partitions)
    store = ParamClient.from_settings(settings)
    features = None if no_feature_store else FeatureStore.from_url(
        settings.redis_url, FeatureStoreConfig.from_settings(settings))
    config = TrainerConfig(batch_events=batch_events, batch_seconds=batch_seconds,
                           evaluate_every=evaluate_every, max_events=max_events, idle_exit_seconds=idle_exit,
                           report_path=report_path, warmup_events=warmup_events)
    exploration = ExplorationStore.from_url(
        settings.redis_url, settings.feature_prefix, settings.redis_cluster,
        config=ExplorationConfig(settings.explore_max_age_s, settings.explore_min_impressions)) if explore else None
    trainer = OnlineTrainer(settings, [model_class(name)(**hyper[name], store=store) for name in models], config,
                            features, exploration=exploration)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: trainer.stop_requested.set())
    with threadpool_limits(1):  # small matrix products: BLAS threads only contend on 2 cores
        try:
            trainer.run()
        except StateOfAnotherLog as exc:  # an operator's decision, not a crash: said in one line
            raise click.ClickException(str(exc)) from None
    report = trainer.report()
    store.close()
    if as_json:
        print_json(report)


@click.command("pipeline")
@click.option("--events", type=int, default=200_000, show_default=True)
@click.option("--client", type=click.Choice(["kafka-python", "confluent"]), help="[settings.kafka_client]")
@click.option("--data", "data", type=DATA,
              help="replay this log (a path, or a data-set name) instead of synthetic events")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True,
              help="format of a --data PATH (a data-set name brings its own)")
@click.option("--trainers", type=click.IntRange(1, 16), default=1, show_default=True,
              help="trainer processes in one consumer group (the topic gets at least this many partitions)")
@click.option("--shards", type=click.IntRange(1, 16), default=1, show_default=True, help="parameter-server shards")
@click.option("--json", "as_json", is_flag=True, help="(output is always JSON)")
@click.pass_context
def bench_pipeline(ctx: click.Context, events: int, client: str | None, data: DataSource | None, fmt: str,
                   trainers: int, shards: int, as_json: bool) -> None:
    """Events through the real broker into a running trainer, parameter server (checkpoints on) and
    feature store: once with the log pre-loaded, once with a concurrent producer, beside the raw
    client's speed on the same bytes."""
    from streamrec.trainer.online.bench import run_pipeline_bench

    settings = settings_from(ctx)
    data_path = None if data is None else str(data.path)
    fmt = fmt if data is None else data.format_or(fmt)
    print_json(run_pipeline_bench(settings, events, client or settings.kafka_client, data_path, fmt, trainers, shards))


@click.command("study-cold-users")
@click.option("--data", "data", type=DATA, default=None,
              help="a real log studied beside the synthetic ones (a path, or a data-set name)")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True,
              help="format of a --data PATH (a data-set name brings its own)")
@click.option("--json", "as_json", is_flag=True, help="(output is always JSON)")
def study_cold_users_cmd(data: DataSource | None, fmt: str, as_json: bool) -> None:
    """How serving should rank a user with events but no row (popularity, the items' biases, or the
    fold-in of their recent items at several weights), on synthetic logs of different character and
    --data: hit@10 on validation, the weight chosen there across logs, and the test figures
    (streamrec.trainer.online.cold_users_study)."""
    from streamrec.stream.loaders import load_log
    from streamrec.trainer.online.cold_users_study import study_cold_users, study_logs

    real = None if data is None else load_log(data.path, data.format_or(fmt))
    print_json(study_cold_users(study_logs(real, (data and data.name) or "data")))


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(train_online)
    cli.add_command(study_cold_users_cmd)
    bench.add_command(bench_pipeline)
