"""`streamrec tune`: search a model's hyper-parameters on validation data carved from the training
part, then score the defaults and the winner once on the test part (streamrec.trainer.tuning)."""

from __future__ import annotations

from typing import cast

import click

from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.stream.loaders import FORMATS
from streamrec.trainer.cli import ENGINE_HELP, SPARK_MASTER_HELP, use_engine
from streamrec.trainer.engines import ENGINES, Engine
from streamrec.trainer.interactions import WEIGHTINGS, Weighting


@click.command("tune")
@click.option("--model", "model_name", required=True, help="model name (see docs/models.md)")
@click.option("--protocol", type=click.Choice(["rating", "topn", "prequential"]), required=True)
@click.option("--data", "data", required=True, type=DATA,
              help="log file or folder, or a data-set name like ml-100k")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True,
              help="format of a PATH (a data-set name brings its own)")
@click.option("--param", "params", multiple=True, help="fixed hyper-parameter key=value (not searched)")
@click.option("--trials", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--budget-seconds", type=click.FloatRange(min=1), default=None,
              help="stop searching after this long (trials already started finish)")
@click.option("--metric", default=None, help="validation metric: topn hr@10 (default), ndcg@10, mrr, recall@20; "
              "rating rmse (default), mae; prequential hr@10_second_half (default), ndcg@10_second_half")
@click.option("--weights", type=click.Choice(WEIGHTINGS), default="binary", show_default=True,
              help="topn: implicit confidence from the value column (EVALUATION.md)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True, help=ENGINE_HELP)
@click.option("--spark-master", default=None, help=SPARK_MASTER_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (the only output form)")
@click.pass_context
def tune_cmd(ctx: click.Context, model_name: str, protocol: str, data: DataSource, fmt: str, params: tuple[str, ...],
             trials: int, budget_seconds: float | None, metric: str | None, weights: str, seed: int, engine: str,
             spark_master: str | None, as_json: bool) -> None:
    """Tune MODEL with Optuna (TPE, median pruning) without looking at the test split; one JSON object."""
    from streamrec.core.cli import print_json
    from streamrec.trainer.tuning import tune

    use_engine(ctx, engine, spark_master)
    try:
        result = tune(protocol, model_name, params, str(data.path), data.format_or(fmt), trials, budget_seconds, seed,
                      cast(Weighting, weights), metric, engine=cast(Engine, engine))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    print_json(result)


@click.command("study-defaults")
@click.option("--model", "models", multiple=True, required=True,
              help="ranking model name (repeatable: all models' fits share one pool)")
@click.option("--grid", "grid", multiple=True, required=True,
              help="key=v1,v2,... values to compare (repeatable; the cartesian product is studied); "
                   "*F is F times the model's default, e.g. lr=*0.3,*3")
@click.option("--param", "params", multiple=True, help="fixed hyper-parameter key=value")
@click.option("--data", "data", type=DATA, default=None,
              help="a real log studied at several time splits of its training part, beside the synthetic logs")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="ml-100k", show_default=True,
              help="format of a PATH (a data-set name brings its own)")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="fits in parallel processes")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="also append each model's report to this JSON-lines file as soon as it is complete")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (the only output form)")
def study_defaults_cmd(models: tuple[str, ...], grid: tuple[str, ...], params: tuple[str, ...],
                       data: DataSource | None, fmt: str, jobs: int, out: str | None, as_json: bool) -> None:
    """Compare settings of each MODEL across synthetic logs of different character (and time splits
    of --data) on validation splits only; the winner has the best mean rank (streamrec.trainer.defaults_study)."""
    import orjson

    from streamrec.core.cli import print_json
    from streamrec.core.params import parse_params
    from streamrec.trainer import registry
    from streamrec.trainer.defaults_study import Study, resolve_grid, run_studies

    def append(report: dict[str, object]) -> None:
        if out:
            with open(out, "ab") as handle:
                handle.write(orjson.dumps(report) + b"\n")

    try:
        studies = []
        for model in models:
            cls = registry.model_class(model)
            values: dict[str, list[object]] = {}
            for entry in grid:
                key, _, listed = entry.partition("=")
                if not listed:
                    raise ValueError(f"--grid {entry!r}: expected key=v1,v2,...")
                values[key] = [v if v.startswith("*") else
                               parse_params(cls.Params, [f"{key}={v}"], model).model_dump(exclude_unset=True)[key]
                               for v in listed.split(",")]
            studies.append(Study(model=model, grid=resolve_grid(model, values),
                                 fixed=parse_params(cls.Params, params, model).model_dump(exclude_unset=True)))
        reports = run_studies(studies, str(data.path) if data else None, data.format_or(fmt) if data else fmt,
                              jobs, append)
    except (KeyError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    print_json(reports[0] if len(reports) == 1 else {"studies": reports})
