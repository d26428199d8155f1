"""Serving a batch refit's tables: both sides of one published version, or the version before.

A refit assigned its item vectors and then its user vectors into the same two tables, in place.
A serving poll between the two writes, or a refit that died between them, paired new items with
old users: for a factor model whose space moved between fits, a ranking as good as random, served
until the next successful refit. Here the space flips sign between versions, so a torn pair ranks
the "bad" items first: a served list whose top item is bad is a torn read.
"""

from __future__ import annotations

import threading
import time

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
