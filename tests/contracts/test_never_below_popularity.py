"""Never below popularity (issue 15): with its DEFAULT hyper-parameters, every registered ranking
model ranks the held-out item at least about as well as the popularity list, on data where its
structure is weak (a popular head, weak groups), on data with strong planted groups, and on short
browsing sessions.

A model that learns little blends popularity in (`popularity_blend=auto`, chosen on its own
validation split); the tolerance is one binomial standard error of popularity's hr@10, the noise
of the comparison itself. Neural families train for a few seconds each and run with the slow suite.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from streamrec.stream.synthetic import synthetic_log
from streamrec.trainer import registry
from streamrec.trainer.evaluation.splits import distinct_pairs, leave_last_out
from streamrec.trainer.evaluation.topn import ranking_metrics
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Recommender
from tests.trainer.synthetic import ring_sessions

RANKING = [name for name in registry.names()
           if issubclass(registry.model_class(name), Recommender) and registry.model_class(name).capabilities.implicit
           and name != "popularity"]
NEURAL = {name for name in RANKING if registry.model_class(name).__module__.startswith("streamrec.trainer.models.neural")}
STRUCTURE = {"weak": 0.3, "strong": 0.85, "sessions": None}  # share of each user's events inside their group


@cache
def split(structure: str) -> tuple[Interactions, np.ndarray, np.ndarray]:
    affinity = STRUCTURE[structure]
    log = ring_sessions() if affinity is None else synthetic_log(events=8000, users=600, items=300, affinity=affinity, seed=1)
    data = Interactions.from_log(distinct_pairs(log), implicit=True)
    train, test = leave_last_out(data)
    return data.subset(train), data.user_idx[test], data.item_idx[test]


def hit_rate(name: str, structure: str) -> float:
    train, users, items = split(structure)
    return ranking_metrics(registry.model_class(name)().fit(train), users, items)["hr@10"]


@pytest.mark.parametrize("structure", STRUCTURE)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in NEURAL else n for n in RANKING])
def test_defaults_do_not_rank_below_popularity(name: str, structure: str) -> None:
    """Weak structure: not below popularity by more than one standard error. Strong groups and
    short sessions: above it by more than one standard error (a default that learns nothing on a
    small log, or on histories of a few clicks, fails)."""
    baseline = hit_rate("popularity", structure)
    stderr = np.sqrt(baseline * (1 - baseline) / len(split(structure)[1]))
    got = hit_rate(name, structure)
    if structure == "weak":
        assert got >= baseline - stderr, f"{name} {got:.3f} below popularity ({baseline:.3f}) on weak structure"
    else:
        assert got > baseline + stderr, f"{name} {got:.3f} does not beat popularity ({baseline:.3f}) on {structure}"


def test_the_blend_is_what_keeps_a_weak_model_up() -> None:
    """Without the blend, ALS's defaults fall far below popularity on weak structure: the contract
    above can fail, and the blend is what passes it."""
    train, users, items = split("weak")
    cls = registry.model_class("als")
    alone = ranking_metrics(cls(popularity_blend=0).fit(train), users, items)["hr@10"]
    blended = cls().fit(train)
    assert blended.blend_weight > 0
    assert ranking_metrics(blended, users, items)["hr@10"] > alone + 0.03 and alone < hit_rate("popularity", "weak")
