"""`evaluate`, `tune` and `refit` give the models that read side features the MovieLens folder's side files
when `--param side_data` is not given: `evaluate --model deepfm --data ml-100k` used to measure the
id-only variant (0.0838 hr@10 on MovieLens 100K) while the README reports the model with its side
features (the report command passed them), so a newcomer could not reproduce the table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamrec.trainer import registry
from streamrec.trainer.evaluation.harness import evaluate
from streamrec.trainer.features import side_files_folder
from streamrec.trainer.refit import refit_once
from streamrec.trainer.tuning import tune
from tests.trainer.neural.test_components import write_side_files
from tests.trainer.neural.test_neural_models import planted_sequences

QUICK = ("epochs=1", "batch_size=256", "patience=0", "threads=1", "val_users=20")
SIDE_AWARE = {"wide-deep", "deepfm", "dcn", "dcn-v2", "youtube-dnn", "dssm"}


@pytest.fixture(scope="module")
def movielens_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in MovieLens 100K's layout: u.data (tab-separated) beside u.user and u.item."""
    folder = tmp_path_factory.mktemp("ml-like")
    log = planted_sequences()
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t5\t{int(t)}\n" for u, i, t in
                                           zip(log.user_id, log.item_id, log.timestamp)))
    write_side_files(folder, 160, 60)
    return folder


def test_the_side_aware_families_are_the_ones_that_read_side_files() -> None:
    declared = {name for name in registry.names()
                if getattr(registry.model_class(name), "capabilities", None) and
                registry.model_class(name).capabilities.side_features}
    assert declared == SIDE_AWARE


def test_evaluate_gives_a_side_aware_model_the_folder_unless_told_otherwise(movielens_like: Path) -> None:
    given = evaluate("topn", "deepfm", list(QUICK), movielens_like, "ml-100k")
    assert given["params"]["side_data"] == str(movielens_like.resolve())
    id_only = evaluate("topn", "deepfm", [*QUICK, "side_data="], movielens_like, "ml-100k")
    assert id_only["params"]["side_data"] == ""
    assert given["metrics"] != id_only["metrics"]  # the side fields took part in the fit


def test_models_without_side_features_and_other_formats_are_left_alone(movielens_like: Path) -> None:
    assert evaluate("topn", "ncf-gmf", list(QUICK), movielens_like, "ml-100k")["params"]["side_data"] == ""
    assert side_files_folder(movielens_like / "u.data", "ml-100k") == str(movielens_like.resolve())
    assert side_files_folder(movielens_like, "csv") is None
    assert side_files_folder(movielens_like / "nothing-here", "ml-100k") is None


def test_tune_fixes_the_folder_beside_the_searched_parameters(movielens_like: Path) -> None:
    search = tune("topn", "deepfm", list(QUICK), movielens_like, "ml-100k", trials=1, seed=0)
    assert search["fixed_params"]["side_data"] == str(movielens_like.resolve())
    assert np.isfinite(search["test"]["tuned"]["metrics"]["hr@10"])


def test_a_refit_from_the_folder_fits_the_model_that_was_evaluated(movielens_like: Path, settings, tmp_path) -> None:
    """`refit --from FOLDER` of a side-aware model fitted the id-only variant while `evaluate` on
    the same folder measured the model with side features: serving would rank with another model
    than the one measured."""
    report = refit_once(settings, "deepfm", list(QUICK), str(movielens_like), "ml-100k", tmp_path / "refits",
                        do_publish=False, version=1)
    assert report["params"]["side_data"] == str(movielens_like.resolve())
    id_only = refit_once(settings, "deepfm", [*QUICK, "side_data="], str(movielens_like), "ml-100k",
                         tmp_path / "refits", do_publish=False, version=2)
    assert id_only["params"]["side_data"] == ""
