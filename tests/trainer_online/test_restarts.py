"""Restarts the exactly-once suite does not cover, each found by a fault hunt against real
processes: a shard that comes back from an older checkpoint while no event arrives, a parameter
server whose state belongs to another log under the topic's name, and online MF ranking first on
a log without ratings."""

from __future__ import annotations

import threading

import pytest

from streamrec.core.net import free_port
from streamrec.param_server.client import ParamClient
from streamrec.stream.topics import create_topics, delete_topics
from streamrec.trainer.online.models import OnlineBPR, OnlineMF
from streamrec.trainer.online.trainer import OnlineTrainer, StateOfAnotherLog, TrainerConfig
from tests.trainer_online.conftest import applied, planted_events, produce_events, wait_until


def test_an_idle_trainer_relearns_what_a_shard_lost_to_an_older_checkpoint(online_settings, start_server,
                                                                            tmp_path):
    """Restarts were noticed only in the replies to the trainer's own calls, and an idle trainer
    makes none: the shard served the older state until the next event arrived (an --idle-exit
    trainer left it behind for good)."""
    args = ("--port", str(free_port()), "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0")
    server = start_server(*args)
    produce_events(online_settings, planted_events(600))
    trainer = OnlineTrainer(online_settings, [OnlineBPR(store=ParamClient([server.address]))],
                            TrainerConfig(batch_events=200))
    worker = threading.Thread(target=trainer.run)
    worker.start()
    try:
        wait_until(lambda: applied(server.address) == 600, timeout=60)
        with ParamClient([server.address]) as client:
            client.checkpoint()
        produce_events(online_settings, planted_events(300, seed=1, start=1_700_100_000.0))
        wait_until(lambda: applied(server.address) == 900, timeout=60)
        server.kill()
        restarted = start_server(*args)  # the checkpoint of 600 events, and no event will come
        assert applied(restarted.address) == 600
        wait_until(lambda: applied(restarted.address) == 900, timeout=30)
    finally:
        trainer.stop_requested.set()
        worker.join(30)
    assert not worker.is_alive()


def test_state_learned_beyond_the_topics_end_is_another_logs_and_stops_the_trainer(online_settings,
                                                                                   start_server):
    """A memory-only broker restarted (or the topic deleted and made again) while the parameter
    server kept its checkpoint: the trainer resumed the new log at the old offsets, skipping its
    first events without a word and mixing two logs in the counts."""
    server = start_server("--no-checkpoints")
    produce_events(online_settings, planted_events(900))
    config = TrainerConfig(batch_events=300, idle_exit_seconds=3.0)
    OnlineTrainer(online_settings, [OnlineBPR(store=ParamClient([server.address]))], config).run()
    assert applied(server.address) == 900
    delete_topics(online_settings.kafka_bootstrap, [online_settings.topic])
    topic = online_settings.topic  # made again once the broker has let the old one go
    wait_until(lambda: create_topics(online_settings.kafka_bootstrap, [topic], 3)[topic] == "created", timeout=30)
    produce_events(online_settings, planted_events(60, seed=2, start=1_700_200_000.0))
    trainer = OnlineTrainer(online_settings, [OnlineBPR(store=ParamClient([server.address]))], config)
    with pytest.raises(StateOfAnotherLog, match="learned beyond the end of the topic .* topic ends at"):
        trainer.run()
    assert applied(server.address) == 900  # nothing of the new log mixed in


def test_online_mf_ranking_first_on_a_log_without_ratings(online_settings, start_server):
    """`--model online-mf --model online-bpr` on clicks: online MF holds no item row, and its
    scores indexed the bias column of an empty mirror (IndexError): the trainer died."""
    server = start_server("--no-checkpoints")
    produce_events(online_settings, planted_events(300))
    client = ParamClient([server.address])
    trainer = OnlineTrainer(online_settings, [OnlineMF(store=client), OnlineBPR(store=client)],
                            TrainerConfig(batch_events=100, idle_exit_seconds=3.0, evaluate_every=1))
    trainer.run()
    assert trainer.stats.applied == 300


def test_a_trainer_fenced_by_another_consumer_group_says_so(online_settings, start_server, caplog):
    """A trainer in another consumer group claimed the partitions on the parameter server: this
    one dropped its batch as fenced and then learned nothing, without a word, for good (only its
    own group's reassignment clears a fence, and a group of one never reassigns)."""
    server = start_server("--no-checkpoints")
    produce_events(online_settings, planted_events(300))
    config = TrainerConfig(batch_events=100, fenced_warning_seconds=1.0)
    first = OnlineTrainer(online_settings, [OnlineBPR(store=ParamClient([server.address]))], config)
    worker = threading.Thread(target=first.run)
    worker.start()
    try:
        wait_until(lambda: applied(server.address) == 300, timeout=60)
        other = online_settings.model_copy(update={"consumer_group": online_settings.consumer_group + "-other"})
        OnlineTrainer(other, [OnlineBPR(store=ParamClient([server.address]))],
                      TrainerConfig(batch_events=100, idle_exit_seconds=2.0)).run()  # claims, finds nothing new
        produce_events(online_settings, planted_events(100, seed=3, start=1_700_300_000.0))
        wait_until(lambda: any("fenced: a trainer outside its consumer group" in r.getMessage()
                               for r in caplog.records if r.levelname == "ERROR"), timeout=60)
        assert first.report()["fenced_partitions"]
    finally:
        first.stop_requested.set()
        worker.join(30)
