"""Serving a batch refit's tables: both sides of one published version, or the version before.

A refit assigned its item vectors and then its user vectors into the same two tables, in place.
A serving poll between the two writes, or a refit that died between them, paired new items with
old users: for a factor model whose space moved between fits, a ranking as good as random, served
until the next successful refit. Here the space flips sign between versions, so a torn pair ranks
the "bad" items first: a served list whose top item is bad is a torn read.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamrec.param_server.client import ParamClient
from streamrec.stream.loaders import InteractionLog
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models import create
from streamrec.trainer.models.base import Recommender
from streamrec.trainer.models.export import Export
from streamrec.trainer.refit import publish
from tests.param_server.conftest import ServerProcess
from tests.serving.conftest import StartServing, wait_for

DIM, USERS, ITEMS = 4, 8, 10  # ITEMS good and ITEMS bad items
TOO_LONG_ID = "u" + "x" * 2000  # past the parameter server's 1,024-byte keys: the user side fails


def fitted(users: list[str]) -> Recommender:
    """A real ALS fitted on a tiny log: its ids are what a refit publishes (the vectors come from `space`)."""
    items = [f"good-{j}" for j in range(ITEMS)] + [f"bad-{j}" for j in range(ITEMS)]
    pairs = [(u, i) for u in users for i in items[:: 3]] + [(users[0], i) for i in items]
    log = InteractionLog(np.array([u for u, _ in pairs], object), np.array([i for _, i in pairs], object),
                         np.full(len(pairs), np.nan), np.arange(len(pairs), dtype=float))
    return create("als", factors=DIM, iterations=1).fit(Interactions.from_log(log, implicit=True))


def space(model: Recommender, generation: int) -> Export:
    """Users and good items point one way, bad items the other; the way flips with the
    generation, and the length grows with it (scores tell generations apart)."""
    rng = np.random.default_rng(generation)
    way = np.full(DIM, (-1.0) ** generation, np.float32) * (1 + generation / 10)
    good = np.array([str(i).startswith("good") for i in model.items.ids])
    items = np.where(good[:, None], way, -way) + rng.normal(0, 0.01, (len(good), DIM)).astype(np.float32)
    return Export(item_vectors=items.astype(np.float32), user_vectors=np.tile(way, (len(model.users.ids), 1)))


def top(serving, user: str) -> dict:
    reply = serving.get("/recommend", user_id=user, k=3, exclude_seen="false")
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_serving_never_pairs_items_and_users_of_two_refits(ps: ParamClient, param_server: ServerProcess,
                                                          redis_url: str, prefix: str,
                                                          start_serving: StartServing) -> None:
    users = [f"u{n}" for n in range(USERS)]
    model = fitted(users)
    publish(ps, model, 1, space(model, 1))
    serving = start_serving(param_server.address, redis_url, prefix, poll=0.05,
                            args=("--item-table", "refit_als_items", "--user-table", "refit_als_users",
                                  "--index", "flat"))
    first = top(serving, "u1")
    assert first["items"][0]["item_id"].startswith("good")

    # a refit that dies after its item vectors are in (here: a user id the server refuses)
    broken = fitted(users + [TOO_LONG_ID])
    with pytest.raises(ValueError, match="1024 bytes"):  # refused by the client before it is sent
        publish(ps, broken, 2, space(broken, 2))
    synced = serving.get("/readyz").json()["synced_at"]
    wait_for(lambda: serving.get("/readyz").json()["synced_at"] > synced + 0.2)
    after_crash = top(serving, "u1")
    assert after_crash["items"][0]["item_id"].startswith("good"), after_crash
    assert after_crash["items"][0]["score"] == pytest.approx(first["items"][0]["score"], rel=1e-4)

    # refits published back to back while requests run: every answer is one version's
    stop, generations = threading.Event(), []

    def refits() -> None:
        with ParamClient([param_server.address]) as writer:
            generation = 2
            while not stop.is_set():
                generation += 1
                publish(writer, model, generation, space(model, generation))
                generations.append(generation)

    thread = threading.Thread(target=refits)
    thread.start()
    answers = []
    try:
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            answers.append(top(serving, users[len(answers) % USERS]))
    finally:
        stop.set()
        thread.join()
    torn = [answer for answer in answers if not answer["items"][0]["item_id"].startswith("good")]
    assert not torn, torn[:3]
    scores = {round(answer["items"][0]["score"], 1) for answer in answers}
    assert len(generations) >= 3 and len(scores) >= 2  # refits were published and served during the load
    final = generations[-1]
    expected = DIM * (1 + final / 10) ** 2
    wait_for(lambda: top(serving, "u2")["items"][0]["score"] == pytest.approx(expected, rel=0.02))


def serve_refit(start_serving: StartServing, address: str, redis_url: str, prefix: str, poll: float = 0.1,
                args: tuple[str, ...] = ()):
    return start_serving(address, redis_url, prefix, poll=poll,
                         args=("--item-table", "refit_als_items", "--user-table", "refit_als_users", "--index", "flat",
                               *args))


def test_a_blob_that_is_no_alias_is_refused_once_and_the_next_refit_replaces_it(
        ps: ParamClient, param_server: ServerProcess, redis_url: str, prefix: str, start_serving: StartServing) -> None:
    """A blob at the alias's name that is not one (or names another model's tables) failed every
    poll (item and user deltas and artefacts no longer followed) and every refit after it (which
    read it first), for good. Now serving refuses it once and goes on with its tables, and the
    next refit replaces it."""
    users = [f"u{n}" for n in range(USERS)]
    model = fitted(users)
    written = publish(ps, model, 1, space(model, 1))
    serving = serve_refit(start_serving, param_server.address, redis_url, prefix)
    for garbage in (b'{"version": 1, "tables": {"refit_als_items": 5}}',
                    b'{"version": 1, "tables": {"refit_als_items": "bpr_items"}}'):  # another model's table
        ps.put_blob("tables/refit_als_items", garbage)
        ready = wait_for(lambda: (r := serving.get("/readyz").json()).get("refused_artifacts", {}).get(
            "tables/refit_als_items") and r)
        assert ready["last_error"] is None
    before = serving.get("/readyz").json()["synced_version"]
    items = written["aliases"]["refit_als_items"]
    width = ps.tables()[items]["spec"]["dim"]  # the vector and the blend coordinate (stable_width)
    row = np.full((1, width), -50.0, np.float32)  # generation 1 points the negative way
    ps.assign(items, ["good-0"], row, np.zeros(1, np.float32))  # still followed
    wait_for(lambda: serving.get("/readyz").json()["synced_version"] > before)
    assert top(serving, "u1")["items"][0]["item_id"] == "good-0"
    replaced = publish(ps, model, 2, space(model, 2))  # the refit is not stopped by the garbage
    expected = DIM * (1 + 2 / 10) ** 2
    wait_for(lambda: top(serving, "u1")["items"][0]["score"] == pytest.approx(expected, rel=0.02))
    assert "tables/refit_als_items" not in serving.get("/readyz").json()["refused_artifacts"]
    assert set(replaced["aliases"].values()) <= set(ps.tables())


def test_a_refit_that_fails_leaves_no_tables_behind(ps: ParamClient) -> None:
    """A refit failing after its item table was written left a whole copy every period until one
    succeeded: the server grew without bound under a refit that kept failing."""
    users = [f"u{n}" for n in range(USERS)]
    model = fitted(users)
    publish(ps, model, 1, space(model, 1))
    held = set(ps.tables())
    broken = fitted(users + [TOO_LONG_ID])
    for version in (2, 3, 4):
        with pytest.raises(ValueError, match="1024 bytes"):
            publish(ps, broken, version, space(broken, version))
    assert set(ps.tables()) == held


def test_two_refits_within_one_poll_make_uncached_users_degraded_until_an_early_poll(
        ps: ParamClient, param_server: ServerProcess, redis_url: str, prefix: str, start_serving: StartServing) -> None:
    """A publish drops the version before the one it replaces; a worker that has not polled since
    then still reads it. Its user pulls found no table and answered every user not cached as a
    cold start with no word, until the next poll (a minute by default, ten minutes here). Now such a
    request says the parameter server did not answer it, and the worker polls at once and serves
    the newest version."""
    users = [f"u{n}" for n in range(USERS)]
    model = fitted(users)
    publish(ps, model, 1, space(model, 1))
    serving = serve_refit(start_serving, param_server.address, redis_url, prefix, poll=600.0,
                          args=("--user-cache-size", "2"))
    assert not top(serving, "u0")["cold_start"]
    dropped = [publish(ps, model, version, space(model, version))["dropped"] for version in (2, 3)]
    assert dropped[1], "the third publish drops the first version, which the worker still serves"
    first = top(serving, users[3])  # past the two users the cache holds
    assert first["cold_start"] and "param_server" in first["degraded"], first
    newest = DIM * (1 + 3 / 10) ** 2
    for user in users[3:]:  # within seconds, not at the next poll
        wait_for(lambda user=user: (a := top(serving, user)) and not a["cold_start"] and not a["degraded"]
                 and a["items"][0]["score"] == pytest.approx(newest, rel=0.02), timeout=60)


def test_a_refit_replica_starting_after_an_alias_switch_keeps_its_tables(ps: ParamClient) -> None:
    """B puts its alias; A (another replica) starts right then, reads B's alias and writes its
    tables; B's clean-up then listed the tables and dropped A's, and A's alias (over B's version,
    which it had read) named tables that no longer existed. B now drops only among the tables that
    existed before its alias was put."""
    from streamrec.param_server.table_alias import encode_alias, read_alias
    from streamrec.trainer.refit import drop_old_versions, stable_width, stage_tables, switch_tables

    users = [f"u{n}" for n in range(USERS)]
    model = fitted(users)
    publish(ps, model, 1, space(model, 1))
    b = stage_tables(ps, model, stable_width(model, space(model, 2)), 2, {"tables": {}})
    existing = list(ps.tables())  # what B's switch lists before its compare and set
    ps.put_blob(b.alias, encode_alias(b.version, b.aliases), expect=b.expect)
    a = stage_tables(ps, model, stable_width(model, space(model, 3)), 3, {"tables": {}})  # A reads B's alias
    drop_old_versions(ps, existing, b.aliases, b.replaced)  # B's clean-up, after A began
    switch_tables(ps, a)
    _, aliases = read_alias(ps, "refit_als_items")
    assert aliases == a.aliases and set(aliases.values()) <= set(ps.tables())


def test_a_worker_follows_an_alias_a_restored_shard_brings_back_older(
        tmp_path: Path, redis_url: str, prefix: str, start_serving: StartServing) -> None:
    """A shard restored from a checkpoint taken before the last publish brings the alias back at
    an older version, naming the tables it has. A running worker only followed newer versions: it
    kept reading the newer tables, which were gone, and failed every poll until the next refit,
    while a worker started then served the restored version."""
    import os

    from tests.serving.conftest import free_port

    env = {**os.environ, "STREAMREC_HOME": str(tmp_path / "ps")}
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    args = ["--port", str(free_port()), "--checkpoint-dir", str(tmp_path / "checkpoints"), "--checkpoint-every", "0"]
    server = ServerProcess(args, env)
    try:
        users = [f"u{n}" for n in range(USERS)]
        model = fitted(users)
        with ParamClient([server.address]) as client:
            publish(client, model, 1, space(model, 1))
            client.checkpoint()
            publish(client, model, 2, space(model, 2))
        serving = serve_refit(start_serving, server.address, redis_url, prefix)
        second = DIM * (1 + 2 / 10) ** 2
        wait_for(lambda: top(serving, "u1")["items"][0]["score"] == pytest.approx(second, rel=0.02))
        server.kill()
        server = ServerProcess(args, env)  # the same address, the state of the checkpoint
        first = DIM * (1 + 1 / 10) ** 2
        wait_for(lambda: top(serving, "u1")["items"][0]["score"] == pytest.approx(first, rel=0.02))
        assert serving.get("/readyz").json()["last_error"] is None
    finally:
        server.kill()


def test_an_early_poll_that_finds_no_newer_version_is_not_repeated(
        ps: ParamClient, param_server: ServerProcess, redis_url: str, prefix: str, start_serving: StartServing) -> None:
    """The user table of the version served is gone with no newer alias (dropped by hand, or a
    shard restored without it): every uncached user's pull asks for an early poll, and the worker
    polled every second for as long as it lasted. Now one early poll per poll interval."""
    users = [f"u{n}" for n in range(USERS)]
    model = fitted(users)
    written = publish(ps, model, 1, space(model, 1))
    serving = serve_refit(start_serving, param_server.address, redis_url, prefix, poll=600.0,
                          args=("--user-cache-size", "2"))

    def polls() -> float:
        text = serving.get("/metrics").text
        return float(re.search(r"^streamrec_serving_sync_seconds_count ([\d.e+]+)$", text, re.M).group(1))

    before = polls()
    assert ps.drop_table(written["aliases"]["refit_als_users"])
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:  # uncached users, each pull finding the version gone
        for user in users[3:]:
            assert "param_server" in top(serving, user)["degraded"]
        time.sleep(0.2)
    assert polls() - before <= 1
