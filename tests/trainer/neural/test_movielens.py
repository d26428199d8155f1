"""MovieLens 100K quality check (slow): a few neural families with reduced epochs beat popularity (GRU4Rec needs
~15 epochs before it leaves popularity behind, too long for this check)
on the topn protocol. Full-budget figures come from `python -m streamrec.trainer.models.neural.report`."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamrec.trainer.evaluation.harness import evaluate

POPULARITY_HR = 0.0498
QUICK = {
    "ncf-gmf": ("epochs=6",),
    "youtube-dnn": ("epochs=6",),
    "caser": ("epochs=4",),
    "deepfm": ("epochs=4", "val_users=200", "side_data={data}"),
}


@pytest.mark.slow
def test_neural_models_beat_popularity_on_movielens(ml100k: Path) -> None:
    results = {name: evaluate("topn", name, [p.format(data=ml100k) for p in params], ml100k)["metrics"]["hr@10"]
               for name, params in QUICK.items()}
    assert all(hr > POPULARITY_HR + 0.01 for hr in results.values()), results
