"""The results table of docs/models.md: every family on MovieLens 100K beside the ANCHORS figures.

`streamrec bench models --data PATH` runs each row through `streamrec evaluate`'s harness and
prints one JSON object (rows + a markdown table), so the README table comes from one command.
"""

from __future__ import annotations

from typing import Any

from streamrec.core.progress import track

# (protocol, model, params, reference label, reference metrics, reference fit seconds)
ROWS: tuple[tuple[str, str, tuple[str, ...], str, dict[str, float], float | None], ...] = (
    ("rating", "mf-sgd", (), "Surprise SVD", {"rmse": 0.9380, "mae": 0.7390}, 0.32),
    ("rating", "svdpp", (), "Surprise SVDpp", {"rmse": 0.9218, "mae": 0.7238}, 9.4),
    ("rating", "svdpp", ("lr=0.015", "lr_bias=0.01"), "Surprise SVDpp", {"rmse": 0.9218, "mae": 0.7238}, 9.4),
    ("rating", "timesvdpp", ("lr=0.015", "lr_bias=0.01"), "our SVD++ (tuned lr)", {}, None),
    ("rating", "item-knn", (), "Surprise KNNBaseline", {"rmse": 0.9204, "mae": 0.7214}, 0.51),
    ("rating", "user-knn", (), "Surprise KNNBasic, item-based (orientation)", {"rmse": 1.0300, "mae": 0.8141}, 0.34),
    ("rating", "neighborhood-factor", (), "-", {}, None),
    ("rating", "rbm", (), "-", {}, None),
    ("rating", "blend", (), "best member", {}, None),
    ("topn", "popularity", (), "popularity", {"hr@10": 0.0498, "ndcg@10": 0.0254}, 0.0),
    ("topn", "als", (), "implicit ALS alpha 40", {"hr@10": 0.0976, "ndcg@10": 0.0509}, 0.17),
    ("topn", "bpr", (), "implicit BPR", {"hr@10": 0.0997, "ndcg@10": 0.0462}, 0.88),
    ("topn", "item-knn", (), "implicit Cosine K=100", {"hr@10": 0.0615, "ndcg@10": 0.0283}, 0.05),
    ("topn", "amazon-i2i", (), "implicit BM25 K=100", {"hr@10": 0.0689, "ndcg@10": 0.0340}, 0.05),
    ("topn", "user-knn", (), "-", {}, None),
    ("prequential", "online-popularity", (), "popularity online", {"hr@10_second_half": 0.0784, "ndcg@10_second_half": 0.0364}, None),
)
SHOWN = {"rating": ("rmse", "mae"), "topn": ("hr@10", "ndcg@10"), "prequential": ("hr@10_second_half", "ndcg@10_second_half")}


def unknown_models(only: tuple[str, ...]) -> str | None:
    """Why `only` selects nothing it should (None when every name is a model of the table): an
    unknown name gave an empty table and exit 0, as if the run had passed."""
    known = sorted({row[1] for row in ROWS})
    unknown = [name for name in only if name not in known]
    if not unknown:
        return None
    return f"not models of the table: {', '.join(unknown)}; the table's models: {', '.join(known)}"


def run_table(data: str, fmt: str, seed: int, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate every row (or the models named in `only`) and build the markdown table."""
    from streamrec.trainer.evaluation.harness import evaluate

    unknown = unknown_models(only)
    if unknown:
        raise ValueError(unknown)

    rows, lines = [], [
        "| protocol | model | params | metric | ours | reference | ref. value | fit s (ours) | fit s (ref.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    selected = [row for row in ROWS if not only or row[1] in only]
    for protocol, model, params, ref_name, ref, ref_fit in track(selected, "models", len(selected)):
        result = evaluate(protocol, model, params, data, fmt, seed)
        rows.append(result)
        for metric in SHOWN[protocol]:
            ours = result["metrics"][metric]
            reference = ref.get(metric)
            lines.append(
                f"| {protocol} | {model} | {' '.join(params) or 'defaults'} | {metric} | {ours:.4f} | {ref_name} | "
                f"{'-' if reference is None else f'{reference:.4f}'} | {result['fit_seconds']:.2f} | "
                f"{'-' if ref_fit is None else ref_fit} |"
            )
    return {"rows": rows, "markdown": "\n".join(lines)}
