"""Impressions as negatives (issue 17, part 2): what serving showed and the user passed over.

The memory (`ShownItems`), the model's use of it (`OnlineBPR(impression_negatives=...)`), and the
trainer reading serving's impressions topic on the real broker.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamrec.core.params import ParamError
from streamrec.param_server.client import ParamClient
from streamrec.stream.events import EventBatch
from streamrec.stream.impressions import encode_records
from streamrec.stream.kafka import make_producer
from streamrec.trainer.online.metrics import IMPRESSION_NEGATIVES, IMPRESSIONS_READ
from streamrec.trainer.online.models import OnlineBPR
from streamrec.trainer.online.shown import ShownItems
from streamrec.trainer.online.trainer import OnlineTrainer, TrainerConfig
from tests.trainer_online.conftest import planted_events, produce_events, wait_until


def objects(*values: str) -> np.ndarray:
    return np.array(values, object)


def counted(counter) -> float:
    return counter._value.get()


def test_a_user_s_negatives_come_from_their_newest_answer_less_what_they_picked():
    shown = ShownItems()
    shown.add([{"user_id": "u:1", "items": ["a", "b"]}, {"user_id": "u:1", "items": ["c", "d", "e"]},
               {"user_id": "u2", "items": ["x"]}, {"user_id": "u4", "items": ["y"]}])
    assert shown.shown_to("u:1") == ["c", "d", "e"]  # the newest answer replaces the older one
    # u:1 picks c, then e in the same batch: neither is ever a negative, even for the earlier event
    picks = shown.take_negatives(objects("u:1", "u:1", "u3"), objects("c", "e", "c"), 4, np.random.default_rng(0))
    assert picks[:2].ravel().tolist() == ["d"] * 8
    assert picks[2].tolist() == [None] * 4  # u3 was shown nothing: its slots keep sampled negatives
    # the answer is used once: u:1's next event, with nothing shown since, gets sampled negatives
    assert shown.shown_to("u:1") == [] and shown.shown_to("u2") == ["x"]
    assert shown.take_negatives(objects("u:1"), objects("q"), 2, np.random.default_rng(0)).tolist() == [[None, None]]
    shown.add([{"user_id": "u:1", "items": ["f"]}])
    shown.forget(objects("u:1", "u2"))  # events learned before a restart answered what was shown
    assert shown.shown_to("u:1") == shown.shown_to("u2") == [] and shown.shown_to("u4") == ["y"]


def test_draws_spread_over_the_shown_items():
    shown = ShownItems()
    shown.add([{"user_id": "u", "items": [f"i{n}" for n in range(10)]}])
    picks = shown.take_negatives(objects(*["u"] * 200), objects(*["other"] * 200), 5, np.random.default_rng(1))
    counts = np.unique(picks.ravel(), return_counts=True)[1]
    assert len(counts) == 10 and counts.min() > 50  # 1,000 draws over 10 items: each about 100


def test_what_is_not_an_impression_is_counted_not_kept():
    shown = ShownItems(per_user=3, users=2)
    invalid = counted(IMPRESSIONS_READ.labels("invalid"))
    kept = shown.add([{"user_id": 7, "items": ["a"]}, {"user_id": "u", "items": "abc"},
                      {"user_id": "u", "items": ["a", None]}, [1, 2], "x" * 10_000,
                      {"user_id": "u" * 10_000, "items": [f"i{n}" for n in range(50)]},
                      {"user_id": "v", "items": []}, {"user_id": "w", "items": ["z"]}])
    assert kept == 3 and counted(IMPRESSIONS_READ.labels("invalid")) - invalid == 5
    assert len(shown) == 2 and shown.shown_to("u" * 10_000) == []  # two users at most: the oldest goes
    assert shown.shown_to("w") == ["z"]
    shown.add([{"user_id": "u" * 10_000, "items": [f"i{n}" for n in range(50)]}])
    assert shown.shown_to("u" * 10_000) == ["i0", "i1", "i2"]  # per_user items at most


def test_impression_negatives_cannot_exceed_the_negatives():
    with pytest.raises(ParamError, match="impression_negatives"):
        OnlineBPR(negatives=3, impression_negatives=4)
    assert OnlineBPR().shown is None  # off by default: nothing is read or kept


def mean_score(model: OnlineBPR, items: np.ndarray) -> float:
    scored = model.score_users(objects("u0"))
    return float(scored.scores[0, scored.item_ids.get_indexer(items)].mean())


def twin_scores(impression_negatives: int) -> tuple[float, float]:
    """Mean score of what u0 was shown and passed over, before and after u0's next batch."""
    model = OnlineBPR(negatives=4, impression_negatives=impression_negatives, seed=3)
    warm = EventBatch.from_events(planted_events(3000))
    for start in range(0, len(warm), 500):
        model.learn_many(warm.take(slice(start, start + 500)))
    passed_over = objects(*[f"i{n}" for n in range(5)])  # cluster 0: u0's own, well liked
    before = mean_score(model, passed_over)
    if model.shown is not None:
        model.shown.add([{"user_id": "u0", "items": passed_over.tolist()}])
    picks = [{"event_id": f"n{n}", "user_id": "u0", "item_id": f"i{10 + n % 15}", "event_type": "click",
              "timestamp": 1_700_010_000.0 + n} for n in range(30)]
    model.learn_many(EventBatch.from_events(picks))
    return before, mean_score(model, passed_over)


def test_items_shown_and_passed_over_lose_score_against_sampled_negatives_alone():
    before, sampled = twin_scores(0)
    same_before, with_impressions = twin_scores(4)
    assert before == pytest.approx(same_before)  # the same model up to u0's batch
    assert with_impressions < sampled - 0.5, (before, sampled, with_impressions)


def test_the_trainer_learns_from_the_impressions_serving_logged(online_settings, start_server):
    """Impressions on the real topic (with junk beside them) reach the trainer's model, whose
    negatives then include what each user was shown; the topic is read, never committed."""
    server = start_server("--no-checkpoints")
    events = planted_events(1200, users=40)
    users = sorted({e["user_id"] for e in events})
    impressions = [{"request_id": f"r{n}", "user_id": user, "items": ["i0", "i1", "i2", "i3"], "arm": "a"}
                   for n, user in enumerate(users)]
    with make_producer(online_settings.kafka_bootstrap, online_settings.kafka_client) as producer:
        producer.send(online_settings.impressions_topic, b"not json lines")
        for value in encode_records(impressions):
            producer.send(online_settings.impressions_topic, value)
        producer.flush()
    produce_events(online_settings, events)
    used = counted(IMPRESSION_NEGATIVES)
    invalid = counted(IMPRESSIONS_READ.labels("invalid"))
    client = ParamClient([server.address])
    model = OnlineBPR(store=client, impression_negatives=3)
    trainer = OnlineTrainer(online_settings, [model], TrainerConfig(idle_exit_seconds=3.0, batch_events=300))
    wait_until(lambda: trainer.impressions.records == 2, timeout=30)
    assert counted(IMPRESSIONS_READ.labels("invalid")) - invalid == 1
    assert model.shown.shown_to(users[0]) == ["i0", "i1", "i2", "i3"]
    trainer.run()
    assert trainer.report()["applied"] == 1200
    assert counted(IMPRESSION_NEGATIVES) - used >= 3 * len(users)  # every user's first positive at least
    assert len(model.shown) == 0  # every user answered what they were shown
    assert not trainer.impressions._thread.is_alive()  # closed with the trainer
