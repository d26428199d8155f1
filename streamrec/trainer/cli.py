"""trainer commands: `streamrec evaluate` (EVALUATION.md) and `streamrec refit`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import click

from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.stream.loaders import FORMATS
from streamrec.trainer.engines import ENGINES, Engine
from streamrec.trainer.interactions import WEIGHTINGS, Weighting

ENGINE_HELP = "where batch models are fitted: local (this process) or spark (als, item-knn on Apache Spark)"
SPARK_MASTER_HELP = "Spark master for --engine spark, e.g. local[2] or spark://host:7077 [settings.spark_master]"
NPROC_HELP = ("train a torch family data-parallel in N processes (torch.distributed, DDP under torchrun; gloo on "
              "CPU, nccl on GPU); the global batch stays `batch_size`")
DATA_HELP = "log file or folder, or a data-set name like ml-100k (fetched into the cache when missing)"
FORMAT_HELP = "format of a PATH (a data-set name brings its own)"


def register(cli: click.Group, bench: click.Group) -> None:
    """Attach the trainer's commands to the root group."""
    from streamrec.trainer.tune_cli import study_defaults_cmd, tune_cmd

    cli.add_command(evaluate_cmd)
    cli.add_command(tune_cmd)
    cli.add_command(study_defaults_cmd)
    cli.add_command(refit_cmd)
    bench.add_command(bench_models_cmd)


def with_device(model_name: str, params: tuple[str, ...], device: str | None) -> tuple[str, ...]:
    """`--device X` is `--param device=X` for the models that run on torch devices."""
    if device is None:
        return params
    from streamrec.trainer.models import model_class

    if "device" not in model_class(model_name).Params.model_fields:
        raise click.BadParameter(f"{model_name} does not run on a torch device", param_hint="--device")
    return (*params, f"device={device}")


def use_ranks(model_name: str, nproc: int) -> None:
    """`--nproc N` > 1: re-run this command as N data-parallel ranks under torchrun and exit with
    their status; in a rank other than 0, keep stdout quiet (streamrec.trainer.launch)."""
    from streamrec.trainer.launch import check_data_parallel, quiet_unless_primary, relaunch
    from streamrec.trainer.models import model_class

    quiet_unless_primary()
    if nproc == 1:
        return
    try:
        check_data_parallel(model_class(model_name), nproc)
        status = relaunch(nproc)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    raise SystemExit(status)


def use_engine(ctx: click.Context, engine: str, spark_master: str | None) -> None:
    """Point the Spark session at `--spark-master`, else the settings' master (no-op for local)."""
    if engine == "spark":
        from streamrec.core.cli import settings_from
        from streamrec.trainer.spark.session import use_master

        use_master(spark_master or settings_from(ctx).spark_master)


@click.command("evaluate")
@click.option("--protocol", type=click.Choice(["rating", "topn", "prequential"]), required=True)
@click.option("--model", "model_name", required=True, help="model name (see docs/models.md)")
@click.option("--param", "params", multiple=True, help="hyperparameter key=value (repeatable)")
@click.option("--data", "data", required=True, type=DATA, help=DATA_HELP)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True, help=FORMAT_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="fit once per seed (--seed, --seed + 1, ...): means in `metrics`, each run in `per_seed`")
@click.option("--weights", type=click.Choice(WEIGHTINGS), default="binary", show_default=True,
              help="topn: implicit confidence from the value column (binary, log1p or raw; EVALUATION.md)")
@click.option("--device", default=None, help="torch device of the neural models, e.g. cuda (default: cpu)")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True, help=ENGINE_HELP)
@click.option("--spark-master", default=None, help=SPARK_MASTER_HELP)
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True, help=NPROC_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (the only output form)")
@click.pass_context
def evaluate_cmd(
    ctx: click.Context, protocol: str, model_name: str, params: tuple[str, ...], data: DataSource, fmt: str, seed: int,
    seeds: int, weights: str, device: str | None, engine: str, spark_master: str | None, nproc: int, as_json: bool,
) -> None:
    """Evaluate a model with one protocol of EVALUATION.md; prints one JSON object."""
    from streamrec.core.cli import print_json
    from streamrec.trainer.evaluation.harness import evaluate

    use_ranks(model_name, nproc)
    use_engine(ctx, engine, spark_master)
    try:
        result = evaluate(protocol, model_name, with_device(model_name, params, device), str(data.path),
                          data.format_or(fmt), seed, cast(Weighting, weights), seeds, cast(Engine, engine))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    print_json(result)


@click.command("refit")
@click.option("--model", "model_name", required=True, help="model name (see docs/models.md)")
@click.option("--param", "params", multiple=True, help="hyperparameter key=value (repeatable)")
@click.option("--from", "source", required=True,
              help="'topic' (the interaction topic), 'topic:NAME', a log file/folder, or a data-set name; "
                   "read from the beginning")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True, help=FORMAT_HELP)
@click.option("--every", default=None, help="refit period like 10m, 30s, 1h (default: once)")
@click.option("--out", "out_dir", type=click.Path(), default=None, help="artefact folder (default: $STREAMREC_HOME/refits)")
@click.option("--publish/--no-publish", default=True, show_default=True, help="push to the parameter server")
@click.option("--device", default=None, help="torch device of the neural models, e.g. cuda (default: cpu)")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help=ENGINE_HELP + "; spark reads a Parquet log (`streamrec export --to parquet`)")
@click.option("--spark-master", default=None, help=SPARK_MASTER_HELP)
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True, help=NPROC_HELP)
@click.option("--impressions", default=None,
              help="'topic' (serving's impressions topic) or a JSON-lines file of impressions: what was shown and "
                   "never picked becomes negatives of models with impression_negatives=true")
@click.option("--keep-artefacts", type=click.IntRange(min=1), default=3, show_default=True,
              help="version folders kept per model under --out (older ones are removed after each refit)")
@click.pass_context
def refit_cmd(
    ctx: click.Context, model_name: str, params: tuple[str, ...], source: str, fmt: str,
    every: str | None, out_dir: str | None, publish: bool, device: str | None, engine: str, spark_master: str | None,
    nproc: int, impressions: str | None, keep_artefacts: int,
) -> None:
    """Fit a batch model on the event log and publish it for serving, once or periodically."""
    from streamrec.core.cli import print_json, settings_from
    from streamrec.param_server.client import ParamServerError
    from streamrec.stream.reader import is_topic_source
    from streamrec.trainer.refit import parse_loop_period, refit_loop

    settings = settings_from(ctx)
    if engine == "spark" and nproc > 1:
        raise click.UsageError("--nproc trains torch families; Spark distributes --engine spark fits itself")
    use_ranks(model_name, nproc)
    use_engine(ctx, engine, spark_master)
    if not is_topic_source(source):
        data = DATA.convert(source, None, ctx)
        source, fmt = str(data.path), data.format_or(fmt)
    try:
        period = None if every is None else parse_loop_period(every)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--every") from exc
    try:
        for report in refit_loop(
            settings, model_name, with_device(model_name, params, device), source, fmt, period, out_dir, publish,
            cast(Engine, engine), impressions, keep_artefacts,
        ):
            print_json(report)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    except (ParamServerError, OSError) as exc:  # a one-off refit: the parameter server down or refusing
        raise click.ClickException(f"refit failed: {type(exc).__name__}: {exc}") from exc


@click.command("models")
@click.option("--data", "data", required=True, type=DATA, help=DATA_HELP)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True, help=FORMAT_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--only", multiple=True, help="restrict to these model names of the table (repeatable)")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="also write the table here (its folder must exist)")
def bench_models_cmd(data: DataSource, fmt: str, seed: int, only: tuple[str, ...], markdown_path: str | None) -> None:
    """Every batch family on one data set beside the ANCHORS references (docs/models.md table).
    The JSON is printed before the markdown file is written: the evaluation takes minutes, and a
    file that cannot be written must not lose it."""
    from streamrec.core.cli import print_json
    from streamrec.trainer.benchmarks import run_table, unknown_models

    unknown = unknown_models(only)
    if unknown:
        raise click.BadParameter(unknown, param_hint="--only")
    target = Path(markdown_path) if markdown_path else None
    if target is not None:
        writable_target(target)
    result = run_table(str(data.path), data.format_or(fmt), seed, only)
    print_json(result)
    if target is not None:
        try:
            target.write_text(result["markdown"] + "\n")
        except OSError as exc:  # the folder went away or filled up during the run: the JSON is out already
            raise click.ClickException(f"cannot write {target}: {exc}") from exc


def writable_target(path: Path) -> None:
    """Refuse, before a minutes-long run, a file path whose folder does not exist or cannot be
    written: the write after the run failed with a traceback and took the results with it."""
    folder = path.parent
    if not folder.is_dir():
        raise click.BadParameter(f"{path}: the folder {folder} does not exist", param_hint="--markdown")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise click.BadParameter(f"{path}: not writable", param_hint="--markdown")
