"""Never below popularity (issue 15): with its DEFAULT hyper-parameters, every registered ranking
model ranks the held-out item better than the popularity list on data it was not tuned on.

Three logs with weak signal, each drawn with three seeds (the model's seed follows the log's), and
compared as the mean over seeds:
- `weak`: planted groups that hold only 30 % of each user's events, a popular head, 13 events
  per user;
- `short`: short histories, 4.5 events per user;
- `sessions`: anonymous browsing sessions of about four clicks, each its own user.
The classical families must beat popularity there by more than one standard error of the pooled
comparison (binomial, all test users of the three seeds). Two logs with strong structure (planted
groups, a ring of sessions), one seed each, hold every family, neural ones included, to the same
rule.

Neural families are held to that rule on the weak-signal logs where their defaults meet it as a
mean over the three draws (on `sessions`, where all but ncf-mlp clear it many times over on the
first draw, over that draw alone: `neural_seeds`; the pairs are `NEURAL_ABOVE`, measured
2026-12-01, -02 and -04 with at least two standard errors to spare; docs/models.md, "Where the
defaults still fall short"). Elsewhere they are held to the safety net only, the popularity blend
(`popularity_blend=auto`, its weight chosen on the model's own validation split): one seed each, so
the tolerance is two standard errors, since a blend weight chosen on a validation split of the same
size moves the test figure by about one around popularity's (seeds 0-2 measured: at worst -1.5 SE
on one draw, -0.9 SE as a mean).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import pytest

from streamrec.stream.loaders import InteractionLog
from streamrec.stream.synthetic import session_log, synthetic_log
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
WEAK: dict[str, Callable[[int], InteractionLog]] = {
    "weak": lambda seed: synthetic_log(events=20_000, users=1_500, items=300, affinity=0.3, seed=100 + seed),
    "short": lambda seed: synthetic_log(events=9_000, users=2_000, items=500, affinity=0.6, seed=200 + seed),
    "sessions": lambda seed: session_log(sessions=6_000, items=2_000, seed=300 + seed),
}
STRONG: dict[str, Callable[[int], InteractionLog]] = {
    "groups": lambda seed: synthetic_log(events=8000, users=600, items=300, affinity=0.85, seed=1 + seed),
    "ring": lambda seed: ring_sessions(seed=seed),
}
SEEDS = (0, 1, 2)
# (log, neural family) pairs held to the classical rule: over seeds 0-2 each beat popularity by 2.5
# (ncf-mlp on `weak`) to 66 (ncf-gmf on `sessions`) standard errors; NCF, NeuMF and the four CTR heads
# with `user_history`, DSSM with the common training loop (2026-12-02: +49.0 / +13.2 / +4.0).
# youtube-dnn with its one-layer tower (2026-12-04): +28.1 / +14.4 / +3.2 on `sessions` / `short` / `weak`;
# ncf-mlp with its 128,64 tower (2026-12-04): +2.7 / +4.8 / +2.5. Not yet there: gru4rec on `weak` (+0.6; trained
# through time on logs without sessions, 2026-12-06: +1.6, short of the two standard errors to spare).
NEURAL_ABOVE: dict[str, frozenset[str]] = {
    "sessions": frozenset({"caser", "dcn", "dcn-v2", "deepfm", "dssm", "gru4rec", "ncf-gmf", "ncf-mlp", "neumf",
                           "wide-deep", "youtube-dnn"}),
    "short": frozenset({"caser", "dcn", "dcn-v2", "deepfm", "dssm", "gru4rec", "ncf-gmf", "ncf-mlp", "neumf",
                        "wide-deep", "youtube-dnn"}),
    "weak": frozenset({"caser", "dcn", "dcn-v2", "deepfm", "dssm", "ncf-gmf", "ncf-mlp", "neumf", "wide-deep",
                       "youtube-dnn"}),
}


@cache
def split(log: str, seed: int) -> tuple[Interactions, np.ndarray, np.ndarray]:
    data = Interactions.from_log(distinct_pairs({**WEAK, **STRONG}[log](seed)), implicit=True)
    train, test = leave_last_out(data)
    return data.subset(train), data.user_idx[test], data.item_idx[test]


@cache
def hits(name: str, log: str, seed: int) -> tuple[float, int]:
    """(hr@10, test users) of `name`'s defaults (its seed set to `seed`) on one draw of `log`."""
    train, users, items = split(log, seed)
    cls = registry.model_class(name)
    params = {"seed": seed} if "seed" in cls.Params.model_fields else {}
    return ranking_metrics(cls(**params).fit(train), users, items)["hr@10"], len(users)


def compare(name: str, log: str, seeds: tuple[int, ...]) -> tuple[float, float, float]:
    """(model's mean hr@10, popularity's, one standard error of popularity's pooled over seeds)."""
    got = [hits(name, log, seed) for seed in seeds]
    base = [hits("popularity", log, seed) for seed in seeds]
    baseline, users = float(np.mean([h for h, _ in base])), sum(n for _, n in base)
    return float(np.mean([h for h, _ in got])), baseline, float(np.sqrt(baseline * (1 - baseline) / users))


def slow_if_neural(names: list[str]) -> list[object]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in NEURAL else n for n in names]


@pytest.mark.parametrize("log", WEAK)
@pytest.mark.parametrize("name", [n for n in RANKING if n not in NEURAL])
def test_classical_defaults_beat_popularity_on_weak_signal(name: str, log: str) -> None:
    got, baseline, stderr = compare(name, log, SEEDS)
    assert got > baseline + stderr, f"{name} {got:.3f} does not beat popularity ({baseline:.3f} +- {stderr:.3f}) on {log}"


# The draws the neural families are held to on each log. On `sessions` one: every family but
# ncf-mlp beat popularity by 7.8 (gru4rec) to 41 (ncf-gmf) standard errors on draw 0 alone
# (2026-12-07; caser 9.3), and its fits cost twice those of the other logs (6.2 CPU-minutes a
# draw, CI came within minutes of its 90 with three). ncf-mlp keeps three there: 4.8 on draw 0,
# but 2.7 (of the pooled error) over the three on 2026-12-04, so draws 1 and 2 are thinner. `weak`
# keeps three for all: there ncf-mlp, youtube-dnn and dssm beat popularity by 1.5-2.3 on draw 0.
def neural_seeds(name: str, log: str) -> tuple[int, ...]:
    return SEEDS[:1] if log == "sessions" and name != "ncf-mlp" else SEEDS


@pytest.mark.slow
@pytest.mark.parametrize(("name", "log"), [(name, log) for log in WEAK for name in sorted(NEURAL_ABOVE[log])])
def test_neural_defaults_that_learn_weak_signal_beat_popularity(name: str, log: str) -> None:
    got, baseline, stderr = compare(name, log, neural_seeds(name, log))
    assert got > baseline + stderr, f"{name} {got:.3f} does not beat popularity ({baseline:.3f} +- {stderr:.3f}) on {log}"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "log"), [(name, log) for log in WEAK for name in sorted(NEURAL - NEURAL_ABOVE[log])])
def test_neural_defaults_are_not_below_popularity_on_weak_signal(name: str, log: str) -> None:
    got, baseline, stderr = compare(name, log, SEEDS[:1])
    assert got >= baseline - 2 * stderr, f"{name} {got:.3f} below popularity ({baseline:.3f}) on {log}"


@pytest.mark.parametrize("log", STRONG)
@pytest.mark.parametrize("name", slow_if_neural(RANKING))
def test_defaults_beat_popularity_on_strong_structure(name: str, log: str) -> None:
    got, baseline, stderr = compare(name, log, SEEDS[:1])
    assert got > baseline + stderr, f"{name} {got:.3f} does not beat popularity ({baseline:.3f}) on {log}"


def test_the_blend_is_what_keeps_a_weak_model_up() -> None:
    """Without the blend, BPR's defaults on anonymous sessions rank below popularity: the
    contract above can fail, and the blend (with the per-user sample floor) is what passes it."""
    train, users, items = split("sessions", 0)
    cls = registry.model_class("bpr")
    alone = ranking_metrics(cls(popularity_blend=0).fit(train), users, items)["hr@10"]
    blended = cls().fit(train)
    popularity = hits("popularity", "sessions", 0)[0]
    assert blended.blend_weight > 0 and alone < popularity
    assert ranking_metrics(blended, users, items)["hr@10"] > max(alone, popularity) + 0.01
