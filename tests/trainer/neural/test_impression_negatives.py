"""Impressions as negatives for the ranking networks (issue 17, part 2).

`Interactions.with_shown` keeps the pairs shown and never picked; a pointwise network with
`impression_negatives=true` trains on them as negatives beside the sampled ones; `streamrec refit
--impressions` reads them from a JSON-lines file (or serving's impressions topic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from streamrec.app.cli import cli
from streamrec.stream.impressions import encode_records
from streamrec.stream.kafka import make_producer
from streamrec.stream.loaders import InteractionLog
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.neural.ctr import DeepFM
from streamrec.trainer.models.neural.ncf import GMF
from streamrec.trainer.refit import load_shown
from tests.trainer.test_cli import param_server  # noqa: F401  (a fixture shared with the refit tests)

GROUPS, PER_GROUP, DECOYS = 4, 10, ("d0", "d1", "d2")


def decoy_log(seed: int = 0) -> tuple[InteractionLog, list[dict]]:
    """Users pick their group's items; the decoys are popular with the odd users only, and every
    group has odd and even users. Serving showed the decoys to every even user, who never picked
    one: only impressions say so."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(120):
        group = (u // 2) % GROUPS
        picks = [f"g{group}i{n}" for n in rng.choice(PER_GROUP, 6, replace=False)]
        if u % 2:
            picks += list(DECOYS)
        users += [f"u{u}"] * len(picks)
        items += picks
    n = len(users)
    log = InteractionLog(np.array(users, object), np.array(items, object), np.ones(n),
                         np.arange(n, dtype=np.float64) + 1_700_000_000.0)
    impressions = [{"request_id": f"r{u}", "user_id": f"u{u}", "items": [*DECOYS, f"g{(u // 2) % GROUPS}i0"]}
                   for u in range(0, 120, 2)]
    return log, impressions


def test_shown_pairs_leave_out_what_the_user_picked() -> None:
    log, impressions = decoy_log()
    data = Interactions.from_log(log, implicit=True)
    users = np.array([i["user_id"] for i in impressions for _ in i["items"]] + ["stranger"], object)
    items = np.array([item for i in impressions for item in i["items"]] + ["d0"], object)
    shown = data.with_shown(users, items).shown
    picked = data.binary()
    assert shown.nnz > 0 and shown.multiply(picked).nnz == 0  # never both shown-not-picked and picked
    u0 = data.users.index(["u0"])[0]
    assert {data.items.ids[i] for i in shown[u0].indices} >= set(DECOYS)  # shown to u0, never picked
    with_shown = data.with_shown(users, items)
    assert with_shown.subset(np.arange(len(data)) < 10).shown is with_shown.shown  # splits keep it


def decoy_rank(model_cls: type, impression_negatives: bool, epochs: int, seeds: range = range(3)) -> float:
    """The decoys' mean rank among all items (0: first) for the even users, over a few seeds: a
    rank, not a score gap, so it does not depend on a network's score scale, and several seeds, so
    one float path's draws (which differ between CPUs) decide nothing alone."""
    log, impressions = decoy_log()
    data = Interactions.from_log(log, implicit=True)
    users = np.array([i["user_id"] for i in impressions for _ in i["items"]], object)
    items = np.array([item for i in impressions for item in i["items"]], object)
    even = data.users.index([f"u{u}" for u in range(0, 120, 2)])
    decoys = data.items.index(list(DECOYS))
    ranks = []
    for seed in seeds:
        model = model_cls(epochs=epochs, patience=0, seed=seed, impression_negatives=impression_negatives,
                          popularity_blend=0).fit(data.with_shown(users, items))
        order = np.argsort(-model.user_scores(even, blended=False), axis=1, kind="stable")
        ranks.append(np.argsort(order, axis=1)[:, decoys].mean())
    return float(np.mean(ranks))


# DeepFM's user features let the sampled negatives alone push the decoys down for the even users
# within a few more epochs on this small log, so it is looked at early, where only impressions say it
@pytest.mark.parametrize(("model_cls", "epochs"), [(GMF, 8), (DeepFM, 3)])
def test_what_was_shown_and_passed_over_ranks_lower(model_cls: type, epochs: int) -> None:
    assert decoy_rank(model_cls, True, epochs) > decoy_rank(model_cls, False, epochs) + 2  # the same draws otherwise


def test_impression_negatives_without_impressions_is_a_clear_error() -> None:
    log, _ = decoy_log()
    with pytest.raises(ValueError, match="impression_negatives needs a log with impressions"):
        GMF(epochs=1, impression_negatives=True).fit(Interactions.from_log(log, implicit=True))


def test_refit_reads_impressions_from_a_file(tmp_path: Path, param_server: str, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("STREAMREC_PARAM_SERVERS", param_server)
    monkeypatch.setenv("STREAMREC_HOME", str(tmp_path))
    log, impressions = decoy_log()
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,rating,timestamp\n" + "".join(
        f"{u},{i},1,{int(t)}\n" for u, i, t in zip(log.user_id, log.item_id, log.timestamp)))
    shown = tmp_path / "impressions.jsonl"
    shown.write_bytes(b"\n".join(orjson.dumps(i) for i in impressions) + b'\n{"user_id": 5}\n')
    args = ["refit", "--model", "ncf-gmf", "--from", str(csv), "--format", "csv", "--param", "epochs=2",
            "--param", "impression_negatives=true", "--impressions", str(shown)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["impressions"] == {"shown_pairs": 60 * 3 + sum(1 for u in range(0, 120, 2)
                                                                  if f"g{(u // 2) % GROUPS}i0" not in set(
                                                                      log.item_id[log.user_id == f"u{u}"])),
                                     "invalid": 1}
    refused = CliRunner().invoke(cli, ["refit", "--model", "item-knn", "--from", str(csv), "--format", "csv",
                                       "--impressions", str(shown)])
    assert refused.exit_code == 2 and "does not learn from impressions" in refused.output
    missing = CliRunner().invoke(cli, args[:-1] + [str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "none.jsonl" in missing.output


def test_refit_reads_serving_s_impressions_topic(settings) -> None:
    """The shown pairs of `--impressions topic` come from the real broker, junk records counted."""
    _, impressions = decoy_log()
    with make_producer(settings.kafka_bootstrap, settings.kafka_client) as producer:
        for value in [b"\xff not json", *encode_records(impressions)]:
            producer.send(settings.impressions_topic, value)
        producer.flush()
    users, items, invalid = load_shown(settings, "topic")
    assert invalid == 1 and len(users) == len(items) == 60 * 4
    assert set(zip(users[:4], items[:4])) == {("u0", item) for item in impressions[0]["items"]}
