"""`streamrec tune`: search a model's hyper-parameters on validation data carved from the training
part, then score the defaults and the winner once on the test part (streamrec.trainer.tuning)."""

from __future__ import annotations

from typing import cast

import click

from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.stream.loaders import FORMATS
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
@click.option("--metric", default=None, help="validation metric (default: hr@10; rmse for rating)")
@click.option("--weights", type=click.Choice(WEIGHTINGS), default="binary", show_default=True,
              help="topn: implicit confidence from the value column (EVALUATION.md)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (the only output form)")
def tune_cmd(model_name: str, protocol: str, data: DataSource, fmt: str, params: tuple[str, ...], trials: int,
             budget_seconds: float | None, metric: str | None, weights: str, seed: int, as_json: bool) -> None:
    """Tune MODEL with Optuna (TPE, median pruning) without looking at the test split; one JSON object."""
    from streamrec.core.cli import print_json
    from streamrec.trainer.tuning import tune

    try:
        result = tune(protocol, model_name, params, str(data.path), data.format_or(fmt), trials, budget_seconds, seed,
                      cast(Weighting, weights), metric)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    print_json(result)
