"""`--nproc N`: torch families trained data-parallel by N ranks under torchrun (DDP over gloo on
CPU) learn what one process learns, with the global batch unchanged (issue 18)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest

from streamrec.stream.synthetic import synthetic_log
from streamrec.trainer.models import load
from tests.trainer_online.conftest import STREAMREC

pytestmark = pytest.mark.slow  # several fits in two ranks on two cores


def weak_log_csv(path) -> str:
    """The never-below-popularity contract's `weak` log: little structure, so quality can differ."""
    log = synthetic_log(events=20_000, users=1_500, items=300, affinity=0.3, seed=100)
    pd.DataFrame({"user_id": log.user_id, "item_id": log.item_id, "timestamp": log.timestamp}).to_csv(path, index=False)
    return str(path)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STREAMREC, *args], capture_output=True, text=True, timeout=900, env=env)


def test_two_ranks_evaluate_within_one_standard_error_of_one(tmp_path) -> None:
    data = weak_log_csv(tmp_path / "weak.csv")
    results = {}
    for nproc in (1, 2):
        done = run("evaluate", "--protocol", "topn", "--model", "ncf-gmf", "--data", data, "--format", "csv",
                   "--seeds", "3", "--nproc", str(nproc), "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.splitlines()
        assert len(lines) == 1  # rank 0 alone prints
        results[nproc] = json.loads(lines[0])["metrics"], json.loads(lines[0])["metrics_stderr"]
    (one, one_se), (two, _) = results[1], results[2]
    assert abs(two["hr@10"] - one["hr@10"]) <= one_se["hr@10"], (one, one_se, two)


def test_a_two_rank_refit_writes_once_and_matches_one_rank(tmp_path) -> None:
    data = weak_log_csv(tmp_path / "weak.csv")
    env = {**os.environ, "STREAMREC_HOME": str(tmp_path / "home")}
    reports = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        done = run("refit", "--model", "ncf-gmf", "--nproc", str(nproc), "--from", data, "--format", "csv", "--no-publish",
                   "--out", str(out), env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        reports[nproc] = json.loads(done.stdout)
        assert reports[nproc]["ranks"] == nproc
        assert len(list((out / "ncf-gmf").iterdir())) == 1  # one artefact: rank 0 writes, the other rank does not
    one, two = (load(reports[n]["artefacts"]["model"]) for n in (1, 2))
    users = [f"u{u}" for u in range(0, 1500, 10)]
    a, b = one.recommend(users, k=10, exclude_seen=False)[0], two.recommend(users, k=10, exclude_seen=False)[0]
    # the same averaged steps: the two networks agree on nearly every top-10 item
    assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]) > 0.8


def test_nproc_refuses_what_cannot_be_split(tmp_path) -> None:
    data = weak_log_csv(tmp_path / "weak.csv")
    for args, why in ((("--model", "gru4rec"), "data-parallel"), (("--model", "als"), "data-parallel"),
                      (("--model", "als", "--engine", "spark"), "Spark distributes")):
        done = run("refit", *args, "--nproc", "2", "--from", data, "--format", "csv", "--no-publish")
        assert done.returncode == 2 and why in done.stderr, done.stderr[-2000:]
