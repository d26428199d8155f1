"""The one prequential computation (EVALUATION.md): offline, live and the online-model interface."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from streamrec.app.cli import cli
from streamrec.core.params import ParamError
from streamrec.stream.events import EventBatch
from streamrec.stream.loaders import InteractionLog
from streamrec.trainer.evaluation.harness import evaluate
from streamrec.trainer.evaluation.prequential import (
    ColumnLookup,
    EarlierItems,
    PrequentialScorer,
    run_prequential,
)
from streamrec.trainer.online.base import ItemScores, OnlineRecommender, learn_together
from streamrec.trainer.online.live_eval import LivePrequential
from streamrec.trainer.online.models import OnlineBPR, OnlineMF
from streamrec.trainer.online.popularity import OnlinePopularity
from streamrec.trainer.registry import model_class
from streamrec.trainer.tuning import tune
from tests.trainer_online.conftest import planted_events


def _log(events: list[dict]) -> InteractionLog:
    return InteractionLog(np.array([e["user_id"] for e in events], object), np.array([e["item_id"] for e in events], object),
                          np.full(len(events), np.nan), np.array([e["timestamp"] for e in events]))


def test_unseen_target_is_a_miss_however_few_candidates_the_model_knows():
    items = pd.Index(["a", "b", "c", "d"], dtype=object)

    def scores(users: np.ndarray) -> ItemScores:
        return ItemScores(items, np.array([[3.0, 2.0, 2.0, -np.inf]] * len(users)))

    events = [{"user_id": user, "item_id": item, "timestamp": 1700000000 + n}
              for n, (user, item) in enumerate([("u1", "a"), ("u1", "b"), ("u1", "zz"), ("u2", "d")])]
    found = PrequentialScorer(every=1).evaluate(EventBatch.from_log(_log(events)), {"m": scores})["m"]
    # "a" leads; "b" ties "c" once "a" is excluded; "zz" is not held and "d" is held at -inf: only
    # 2 or 3 known candidates rank above them, but no list the model serves holds them
    assert found.greater.tolist() == [0, 0, 10, 10] and found.ties.tolist() == [0, 1, 0, 0]
    assert found.hit.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_a_log_of_new_items_scores_no_hit(tmp_path):
    """One user, every event a new item: no model has learned the item it is asked about, so
    however short its list of known candidates, no prediction hits (it scored 1.0 when an unseen
    target counted as ranked just below the known candidates)."""
    path = tmp_path / "one-user.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"u,i{n},{1700000000 + n}\n" for n in range(200)))
    for name in ("online-bpr", "online-popularity"):
        metrics = evaluate("prequential", name, [], path, "csv")["metrics"]
        assert metrics["evaluated_events"] == 20
        assert metrics["hr@10_all"] == 0.0 and metrics["ndcg@10_all"] == 0.0, name


def test_cached_history_columns_follow_new_items_new_indexes_and_forgotten_users():
    """The excluded columns are cached per user and model: items that arrive later are appended,
    a new item index (items joined) maps the whole history again, a forgotten user has none."""
    history = EarlierItems(max_users=2)
    history.add(np.array(["u", "u"], object), np.array(["a", "b"], object))
    lookup, other = ColumnLookup(), ColumnLookup()
    first = pd.Index(["a", "c"], dtype=object)
    lookup(first)
    assert history.columns("u", "m", lookup).tolist() == [0]  # "b" is not held
    history.add(np.array(["u"], object), np.array(["c"], object))
    assert history.columns("u", "m", lookup).tolist() == [0, 1]
    lookup(pd.Index(["c", "b", "a"], dtype=object))  # items joined: a new index
    assert sorted(history.columns("u", "m", lookup).tolist()) == [0, 1, 2]
    other(first)
    assert history.columns("u", "other", other).tolist() == [0, 1]
    assert sorted(history.columns("u", "m", lookup).tolist()) == [0, 1, 2]
    history.add(np.array(["v", "w"], object), np.array(["a", "a"], object))  # "u" is the least recent
    assert len(history.columns("u", "m", lookup)) == 0 and not history.of("u")


def test_a_replaced_item_index_is_not_kept_alive_by_the_users_scored_against_it():
    """Each new index replaces the last (the catalogue grows every batch); a user remembered for
    months must not hold the index, and its hash table, of the last time they were scored."""
    history = EarlierItems()
    history.add(np.array(["u"], object), np.array(["a"], object))
    lookup = ColumnLookup()
    old = pd.Index(["a", "b"], dtype=object)
    old.get_indexer(["a"])  # its hash table built, as a mirror's is
    lookup(old)
    assert history.columns("u", "m", lookup).tolist() == [0]
    released = weakref.ref(old)
    lookup(pd.Index(["b", "a"], dtype=object))
    del old
    gc.collect()
    assert released() is None
    assert history.columns("u", "m", lookup).tolist() == [1]  # and the new index maps the history anew


def test_reconsumption_is_learned_not_evaluated_and_positions_stay_every_tenth():
    events = planted_events(60)
    events[20]["item_id"] = events[3]["item_id"]
    events[20]["user_id"] = events[3]["user_id"]  # position 20 repeats an earlier (user, item)
    scorer = PrequentialScorer(every=10)
    model = OnlinePopularity()
    stream = EventBatch.from_log(_log(events))
    found = []
    for start in range(0, len(stream), 7):  # chunks that do not align with the due positions
        chunk = stream.take(slice(start, start + 7))
        found.append(scorer.evaluate(chunk, {model.name: model.score_users})[model.name].position)
        model.learn_many(chunk)
    assert np.concatenate(found).tolist() == [0, 10, 30, 40, 50]
    assert model.store.get_meta()[0]["applied_events"] == 60  # the repeat was learned


def test_live_scoring_reproduces_offline_prequential():
    """Batches of 500 learned in steps of 10 with the live evaluator give exactly the offline
    protocol's figures (popularity learns deterministically, so any difference is the scoring)."""
    events = planted_events(3000)
    events[1500]["user_id"], events[1500]["item_id"] = events[100]["user_id"], events[100]["item_id"]
    log = _log(events)
    offline = run_prequential(OnlinePopularity(), log)["metrics"]
    model = OnlinePopularity()
    live = LivePrequential(model, every=10)
    stream = EventBatch.from_log(log)
    for start in range(0, len(stream), 500):
        batch = stream.take(slice(start, start + 500))
        learn_together([model], batch, before_step=lambda step, batch=batch: live.before_step(batch, step))
        live.end_batch(batch)
    report = live.report()
    assert report["evaluated"] == offline["evaluated_events"] < 300
    assert report["hr@10"] == pytest.approx(offline["hr@10_all"], abs=1e-12)
    assert report["ndcg@10"] == pytest.approx(offline["ndcg@10_all"], abs=1e-12)


@pytest.mark.parametrize("name,cls", [("online-bpr", OnlineBPR), ("online-mf", OnlineMF),
                                      ("online-popularity", OnlinePopularity)])
def test_online_models_are_registered_with_typed_params(name, cls):
    assert model_class(name) is cls and issubclass(cls, OnlineRecommender)
    model = cls(**cls.Params(step_events=5).model_dump())
    assert model.params.step_events == 5
    with pytest.raises(ParamError, match="nope"):
        cls(nope=1)


def test_prequential_refuses_a_batch_model(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,1700000000\n")
    with pytest.raises(ValueError, match="not an online model"):
        evaluate("prequential", "popularity", [], path, "csv")


def test_train_online_validates_params_with_the_shared_parser():
    bad_type = CliRunner().invoke(cli, ["train-online", "--param", "online-bpr.dim=abc"])
    assert bad_type.exit_code == 2 and "dim" in bad_type.output
    unknown = CliRunner().invoke(cli, ["train-online", "--model", "online-popularity", "--param", "online-popularity.lr=1"])
    assert unknown.exit_code == 2 and "lr" in unknown.output


def test_ids_longer_than_the_stream_takes_are_refused_before_learning(tmp_path):
    """The online models take the event stream's ids (at most 256 UTF-8 bytes): 128 two-byte
    characters pass, one more is an error that shows the id."""
    path = tmp_path / "long.csv"
    rows = [f"u{n % 7},i{n % 13},{1700000000 + n}" for n in range(60)]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows[:5] + [f"u1,{'é' * 128},1700000005"] + rows[6:]) + "\n")
    assert evaluate("prequential", "online-popularity", [], path, "csv")["metrics"]["evaluated_events"] == 6
    path.write_text(path.read_text().replace("é" * 128, "é" * 129))
    with pytest.raises(ValueError, match=r"item_id 'é+'\.\.\. is 258 bytes long; .* at most 256"):
        evaluate("prequential", "online-popularity", [], path, "csv")
    # and before a search: tune learned from such ids, then failed at its final fit naming none
    for run in (lambda: tune("prequential", "online-bpr", [], path, "csv", trials=1),
                lambda: evaluate("prequential", "online-bpr", ["tuned=true"], path, "csv")):
        with pytest.raises(ValueError, match=r"item_id 'é+'\.\.\. is 258 bytes long"):
            run()


def test_event_types_the_online_models_do_not_know_are_announced_or_refused(tmp_path, capsys) -> None:
    """A log of "play" events evaluated nothing, exited 0 and said nothing; in a mixed log the
    unknown ones were passed over without a word."""
    events = planted_events(600)
    path = tmp_path / "plays.csv"
    frame = pd.DataFrame({"user_id": [e["user_id"] for e in events], "item_id": [e["item_id"] for e in events],
                          "timestamp": [e["timestamp"] for e in events], "event_type": "play"})
    frame.to_csv(path, index=False)
    with pytest.raises(ValueError, match="no event of the log has a type the online models learn from.*'play' x600"):
        evaluate("prequential", "online-bpr", [], path, "csv")
    frame.loc[::3, "event_type"] = "view"
    frame.to_csv(path, index=False)
    result = evaluate("prequential", "online-bpr", [], path, "csv")
    assert result["metrics"]["evaluated_events"] > 0
    assert "note: 400 of 600 events have a type the online models neither learn from nor score ('play' x400)" in (
        capsys.readouterr().err)
