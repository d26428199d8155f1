"""Online experiments: the schema, sticky and layered assignment (statistically, over many users),
and a real serving worker over HTTP that answers each arm as declared, labels every answer,
counts arms in Prometheus and follows the file as it changes."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.param_server.client import ParamClient
from streamrec.serving.experiments import Experiments, ExperimentsSource, bucket_ends, combined
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.serving.conftest import STREAMREC, load_model, serving_factory, start_param_server, wait_for, write_history

TWO_LAYERS = """
experiments:
  - name: popular-vs-personal
    layer: retrieval
    arms:
      - {name: personal, weight: 3}
      - {name: popular, weight: 1, source: popularity}
  - name: diversity
    layer: ranking
    traffic: 0.5
    arms:
      - {name: plain}
      - {name: diverse, diversity: 0.5}
  - name: knn-only
    layer: ranking
    traffic: 0.25
    arms:
      - {name: knn, candidates: [item_knn, trending]}
"""
USERS = [f"user-{n}" for n in range(20_000)]
# 2 kB of YAML, 9^9 values once its aliases are expanded ("billion laughs"), then a valid file
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + n)}: &{chr(98 + n)} [{', '.join([f'*{chr(97 + n)}'] * 9)}]\n" for n in range(8)) + TWO_LAYERS
# valid YAML 2,000 levels deep: PyYAML's recursive composer raised RecursionError, which ended the sync thread
NESTED = "x: " + "[" * 2000 + "]" * 2000 + "\n"


@pytest.mark.parametrize(("text", "message"), [
    ("experiments: [{name: a, arms: [{name: x}, {name: x}]}]", "arm names repeat"),
    ("experiments: [{name: a, arms: [{name: x}]}, {name: a, arms: [{name: y}]}]", "experiment names repeat"),
    ("experiments: [{name: a, traffic: 0.7, arms: [{name: x}]}, {name: b, traffic: 0.4, arms: [{name: y}]}]",
     "traffic adds up to 1.1 > 1"),
    ("experiments: [{name: 'a:b', arms: [{name: x}]}]", "should match pattern"),
    ("experiments: [{name: a, arms: [{name: x, weight: 0}]}]", "greater than 0"),
    ("experiments: [{name: a, arms: []}]", "at least 1 item"),
    ("experiments: [{name: a, arms: [{name: x, colour: red}]}]", "Extra inputs are not permitted"),
    ("experiments: [{name: a, arms: [{name: x, source: random}]}]", "'personal' or 'popularity'"),
    ("experiments: [{name: a", "not YAML"),
    (BOMB, "more than 100,000 values once YAML aliases are expanded"),
    (NESTED, "nested too deeply to parse"),
    ("experiments: [{name: a, arms: [{name: x, weight: .inf}, {name: y}]}]", "finite number"),
    ("experiments: [{name: a, arms: [{name: x, weight: .nan}, {name: y}]}]", "finite number"),
    ("experiments: [{name: a, arms: [{name: x, weight: 1e308}, {name: y, weight: 1e308}]}]",
     "less than or equal to 1000000"),
    ("experiments: [{name: a, traffic: 0.00004, arms: [{name: x}]}]", "greater than or equal to 0.0001"),
    ("experiments: [{name: a, arms: [{name: x, weight: 1e-300}, {name: y}]}]", "arm(s) ['x']: a weight under"),
])
def test_the_schema_refuses_what_cannot_run(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as refused:
        Experiments.parse(text, "exp.yaml")
    assert "exp.yaml" in str(refused.value) and message in str(refused.value)


def test_assignment_is_sticky_split_by_weight_and_traffic_and_independent_across_layers() -> None:
    first, again = Experiments.parse(TWO_LAYERS), Experiments.parse(TWO_LAYERS)
    assigned = [first.assign(user) for user in USERS]
    assert assigned == [again.assign(user) for user in USERS]  # deterministic: no state anywhere
    retrieval = [next(a.arm.name for a in found if a.experiment == "popular-vs-personal") for found in assigned]
    ranking = [next((f"{a.experiment}/{a.arm.name}" for a in found if a.experiment != "popular-vs-personal"), None)
               for found in assigned]
    n = len(USERS)

    def near(count: int, share: float) -> bool:  # within 4 binomial standard errors
        return abs(count - n * share) <= 4 * np.sqrt(n * share * (1 - share))

    assert near(Counter(retrieval)["popular"], 0.25)
    counts = Counter(ranking)
    assert near(counts["diversity/plain"], 0.25) and near(counts["diversity/diverse"], 0.25)
    assert near(counts["knn-only/knn"], 0.25) and near(counts[None], 0.25)  # the layer's last quarter: no experiment
    # independent layers: the popular arm's share is the same inside every ranking cell
    for cell in counts:
        inside = [r for r, k in zip(retrieval, ranking) if k == cell]
        share = Counter(inside)["popular"] / len(inside)
        assert abs(share - 0.25) <= 4 * np.sqrt(0.25 * 0.75 / len(inside)), cell


def test_every_experiment_gets_the_share_of_users_its_traffic_says() -> None:
    """Shares rounded one by one added up past the last bucket: four experiments of 1.6 buckets
    took 2 each, and the last one of this layer, declared at 0.0001, got no user at all."""
    text = "experiments:\n" + "".join(f"  - {{name: e{n}, traffic: 0.00016, arms: [{{name: a}}]}}\n" for n in range(4))
    text += ("  - {name: mid, traffic: 0.99926, arms: [{name: a}]}\n"
             "  - {name: last, traffic: 0.0001, arms: [{name: a}]}\n")
    experiments = Experiments.parse(text)
    users = [f"user-{n}" for n in range(200_000)]
    counts = Counter(found[0].experiment for found in map(experiments.assign, users) if found)
    assert sum(counts.values()) == len(users)  # the traffic adds up to 1: everyone is in one
    expected = 0.0001 * len(users)
    assert abs(counts["last"] - expected) <= 4 * np.sqrt(expected), counts


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(1e-4, 0.3), min_size=1, max_size=40).filter(lambda traffics: sum(traffics) <= 1),
       st.booleans())
def test_each_experiment_has_the_buckets_its_traffic_gives_it(traffics: list[float], fill: bool) -> None:
    """Ranges are contiguous from bucket 0, none empty, each within one bucket of its traffic; a
    layer whose traffic adds up to 1 covers every bucket."""
    if fill:
        traffics = [*traffics, 1 - sum(traffics)] if 1 - sum(traffics) >= 1e-4 else traffics
    ends = bucket_ends(traffics)
    sizes = [end - start for start, end in zip([0, *ends], ends)]
    assert ends[-1] <= 10_000 and all(size >= 1 for size in sizes)
    assert all(abs(size - t * 10_000) < 1 + 1e-6 for size, t in zip(sizes, traffics))
    if abs(sum(traffics) - 1) < 1e-9:
        assert ends[-1] == 10_000


def test_a_new_salt_reshuffles_its_experiment_and_nothing_else() -> None:
    salted = Experiments.parse(TWO_LAYERS.replace("  - name: diversity\n", "  - name: diversity\n    salt: v2\n"))
    before, after = Experiments.parse(TWO_LAYERS), salted
    moved_arm = moved_other = 0
    for user in USERS:
        old, new = {a.experiment: a.arm.name for a in before.assign(user)}, {a.experiment: a.arm.name for a in after.assign(user)}
        assert old.keys() == new.keys()  # who is in which experiment does not change
        moved_arm += old.get("diversity") != new.get("diversity")
        moved_other += old["popular-vs-personal"] != new["popular-vs-personal"]
    assert moved_other == 0 and 0.4 < moved_arm / (len(USERS) / 2) < 0.6  # half of the experiment's users move


def test_the_arms_of_several_layers_combine_first_setting_first() -> None:
    experiments = Experiments.parse(TWO_LAYERS)
    user = next(u for u in USERS if {a.arm.name for a in experiments.assign(u)} == {"popular", "diverse"})
    arm = combined(experiments.assign(user))
    assert arm is not None and arm.source == "popularity" and arm.diversity == 0.5 and arm.candidates is None


# ---- one serving worker over HTTP ------------------------------------------------------------------
DIM, N_ITEMS = 8, 30
POPULAR = ["i20", "i21", "i22"]


@pytest.fixture
def served(tmp_path: Path, redis_url: str, kafka_bootstrap: str) -> Iterator[tuple[object, Path, str]]:
    server = start_param_server(tmp_path / "ps")
    prefix = f"test-exp-{uuid.uuid4().hex[:10]}"
    start, started = serving_factory(tmp_path / "home")
    rng = np.random.default_rng(5)
    try:
        with ParamClient([server.address]) as client:
            load_model(client, {f"user-{u}": rng.normal(size=DIM).astype(np.float32) for u in range(200)},
                       {f"i{j}": rng.normal(size=DIM).astype(np.float32) for j in range(N_ITEMS)})
        write_history(FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix)),
                      [("someone", item, 1e9) for item, n in zip(POPULAR, (3, 2, 1)) for _ in range(n)])
        path = tmp_path / "experiments.yaml"
        path.write_text(TWO_LAYERS)
        # a reachable broker takes the impressions: a stop then has nothing left to wait for
        yield start(server.address, redis_url, prefix, args=("--index", "flat", "--experiments", str(path)),
                    extra_env={"STREAMREC_KAFKA_BOOTSTRAP": kafka_bootstrap}), path, server.address
    finally:
        for s in started:
            s.stop()
        server.kill()
        FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix)).clear()


def test_every_answer_is_labelled_and_each_arm_is_served_as_declared(served) -> None:
    serving, _, _ = served
    experiments = Experiments.parse(TWO_LAYERS)
    request_ids, arms = set(), Counter()
    for n in range(200):
        user = f"user-{n}"
        body = serving.get("/recommend", user_id=user, k=5, exclude_seen="false").json()
        expected = {a.experiment: a.arm.name for a in experiments.assign(user)}
        assert body["experiments"] == expected and body["experiment"] == "popular-vs-personal"
        assert body["arm"] == expected["popular-vs-personal"]
        request_ids.add(body["request_id"])
        sources = {s for item in body["items"] for s in item["sources"]}
        if body["arm"] == "popular":  # the trending list, whatever the user's vector says (filled to k by bias)
            assert [item["item_id"] for item in body["items"][:len(POPULAR)]] == POPULAR and not body["cold_start"]
            assert len(body["items"]) == 5 and {s for item in body["items"][len(POPULAR):] for s in item["sources"]} \
                == {"prior"}
        else:
            assert "ann" in sources if expected.get("knn-only") is None else "ann" not in sources
        arms.update(f"{e}/{a}" for e, a in expected.items())
    assert len(request_ids) == 200
    metrics = serving.get("/metrics").text
    for cell, count in arms.items():
        experiment, arm = cell.split("/")
        assert f'streamrec_serving_experiment_requests_total{{arm="{arm}",experiment="{experiment}"}} {count}.0' in metrics


def test_the_file_is_followed_and_a_broken_version_keeps_the_last_good_one(served) -> None:
    serving, path, _ = served
    path.write_text("experiments:\n  - name: all-popular\n    arms: [{name: only, source: popularity}]\n")
    wait_for(lambda: serving.get("/recommend", user_id="user-1", k=3).json()["experiment"] == "all-popular")
    path.write_text("experiments: [{name: broken, arms: []}]\n")
    wait_for(lambda: "streamrec_serving_experiments_reload_failures_total 1.0" in serving.get("/metrics").text)
    body = serving.get("/recommend", user_id="user-1", k=3).json()
    assert body["experiment"] == "all-popular" and [i["item_id"] for i in body["items"]] == POPULAR


def test_a_file_nested_too_deeply_is_one_reload_failure_and_the_file_is_still_followed(served) -> None:
    """A 2,000-level nested file raised RecursionError on the sync thread, which ended it: no more
    polls, no more reloads, and the failure counter stayed at 0."""
    serving, path, _ = served
    path.write_text(NESTED)
    wait_for(lambda: reload_failures(serving) == 1.0)
    assert serving.get("/recommend", user_id="user-1", k=3).json()["experiment"] == "popular-vs-personal"
    path.write_text("experiments:\n  - name: all-popular\n    arms: [{name: only, source: popularity}]\n")
    wait_for(lambda: serving.get("/recommend", user_id="user-1", k=3).json()["experiment"] == "all-popular")


def reload_failures(serving) -> float:
    found = re.search(r"^streamrec_serving_experiments_reload_failures_total (\S+)$", serving.get("/metrics").text,
                      re.MULTILINE)
    assert found is not None
    return float(found.group(1))


def test_a_bomb_a_huge_file_or_a_deleted_one_is_refused_once_and_answers_go_on(served) -> None:
    """A 2 kB YAML alias bomb froze the worker for 77 s (describing it in the validation error
    walked 9^9 values holding the GIL); a 50 MB file stalled model sync while it was parsed; a
    deleted file was counted and logged as a new failure at every poll."""
    serving, path, _ = served
    for n, (text, expected) in enumerate(((BOMB, 1.0), ("# " + "x" * (2 << 20) + "\n" + TWO_LAYERS, 2.0))):
        path.write_text(text)
        wait_for(lambda expected=expected: reload_failures(serving) == expected)
        body = serving.get("/recommend", user_id="user-1", k=3).json()
        assert body["experiment"] == "popular-vs-personal", n  # the last good file stays in force
    path.unlink()
    wait_for(lambda: reload_failures(serving) == 3.0)
    time.sleep(3)  # polls go on: the file is still gone, and that is no new failure
    assert reload_failures(serving) == 3.0
    assert serving.get("/readyz").status_code == 200


@pytest.mark.parametrize(("text", "message"), [
    ("experiments: [{name: a, arms: [{name: x}, {name: x}]}]\n", "arm names repeat"),
    (NESTED, "nested too deeply to parse"),  # a usage error, not a RecursionError's traceback
])
def test_serve_refuses_a_broken_file_at_start(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    done = subprocess.run([STREAMREC, "serve", "--experiments", str(path), "--port", "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_the_documented_example_is_a_valid_file() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    example = text.split("### Online experiments", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    experiments = Experiments.parse(example, "docs/serving.md")
    assert [e.name for e in experiments.spec.experiments] == ["diversity-test", "popular-vs-personal"]


def test_a_rewrite_that_keeps_size_and_modification_time_is_reloaded(tmp_path: Path) -> None:
    """The source compared mtime and size: a same-size rewrite within one timestamp tick, or a
    copy that kept both (`cp -p`, `rsync -a`), was never loaded."""
    path = tmp_path / "experiments.yaml"
    path.write_text("experiments: [{name: aaaa, arms: [{name: x}]}]\n")
    source = ExperimentsSource(path)
    assert [e.name for e in source.current.spec.experiments] == ["aaaa"]
    stat = path.stat()
    path.write_text("experiments: [{name: bbbb, arms: [{name: x}]}]\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert source.refresh() == "loaded" and [e.name for e in source.current.spec.experiments] == ["bbbb"]
    assert source.refresh() == "unchanged"
    path.unlink()
    assert source.refresh() == "failed" and source.refresh() == "unchanged"  # reported once
    assert [e.name for e in source.current.spec.experiments] == ["bbbb"]  # the last good one stays
