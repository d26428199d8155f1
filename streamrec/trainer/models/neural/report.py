"""The neural results table (docs/neural.md) from one command:

    python -m streamrec.trainer.models.neural.report --data ml-100k [--model NAME ...]

(`--data` also takes a folder holding the ml-100k files.)

Every row goes through the topn harness of `streamrec evaluate`, which gives the models that read
side features the data folder's `u.user` and `u.item` (`side_data`). Prints one JSON line per model on stderr as it finishes and the
markdown table (with the best classical model and the ANCHORS references) on stdout.
"""

from __future__ import annotations

import json
import sys

import click

from streamrec.stream.datasets.resolve import DATA, DataSource
from streamrec.trainer import registry

CLASSICAL = ("popularity", "als", "bpr")
ANCHORS = (
    ("popularity (ANCHORS)", 0.0498, 0.0254, 0.00),
    ("implicit ALS alpha 40 (ANCHORS)", 0.0976, 0.0509, 0.17),
    ("implicit BPR (ANCHORS)", 0.0997, 0.0462, 0.88),
)


def evaluate_row(model: str, data: str, seed: int) -> dict:
    from streamrec.trainer.evaluation.harness import evaluate

    return evaluate("topn", model, [], data, "ml-100k", seed)


@click.command()
@click.option("--data", required=True, type=DATA, help="the ml-100k folder, or the data-set name ml-100k")
@click.option("--model", "models", multiple=True, help="only these rows (default: classical + all neural)")
@click.option("--seed", type=int, default=0)
def main(data: DataSource, models: tuple[str, ...], seed: int) -> None:
    lines = ["| model | hr@10 | ndcg@10 | fit s |", "|---|---|---|---|"]
    for model in models or (*CLASSICAL, *registry.names("streamrec.trainer.models.neural")):
        result = evaluate_row(model, str(data.path), seed)
        print(json.dumps(result), file=sys.stderr, flush=True)
        m = result["metrics"]
        lines.append(f"| {model} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {result['fit_seconds']:.1f} |")
    lines += [f"| {label} | {hr:.4f} | {ndcg:.4f} | {fit:.2f} |" for label, hr, ndcg, fit in ANCHORS]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
