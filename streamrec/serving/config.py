"""What one serving worker needs to know; built once by `streamrec serve` and handed to every
worker process as JSON in an environment variable (uvicorn starts workers by import string)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from streamrec.core.config import Settings, secret_or_none
from streamrec.serving.filters import ItemFilter
from streamrec.trainer.online.session import SESSION_FADE, SESSION_GAP, SESSION_ITEMS, SESSION_WEIGHT

CONFIG_ENV = "STREAMREC_SERVING_CONFIG_JSON"
MAX_K = 1000
KIB, MIB = 1024, 1024 * 1024
MAX_EVENTS_PER_REQUEST = 10_000
# Bulk endpoints get their own caps; every other route gets `max_body_bytes`.
# /rescore: 10,000 ids of <= 256 bytes plus JSON framing -> 4 MiB.
# /events: 10,000 events; a typical event is ~200 bytes, one with a full context (2 KiB by default,
# STREAMREC_MAX_CONTEXT_BYTES) and three 256-byte ids ~3 KiB, so 16 MiB lets ~5,000 such heavy events
# or 10,000 of ~1.6 KiB through: the count cap (422) binds for ordinary events, the byte cap (413)
# for heavy ones, and a worker never buffers more than 16 MiB of one request.
DEFAULT_ROUTE_BODY_LIMITS = {"/rescore": 4 * MIB, "/events": 16 * MIB}


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    param_servers: list[str] = Field(default_factory=lambda: ["127.0.0.1:7070"])
    param_server_token: str | None = Field(None, repr=False)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = Field(False, description="the feature store is a Redis Cluster (redis_url: any node)")
    api_token: str | None = Field(None, repr=False, description="bearer token; None: the API is open")
    max_body_bytes: int = Field(64 * KIB, ge=0, description="request body cap of routes not in route_body_limits")
    route_body_limits: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_ROUTE_BODY_LIMITS),
                                              description="request body cap per route path (bytes)")
    body_read_timeout_s: float = Field(30.0, gt=0, description="408 when no part of a request body arrives "
                                                                "for this long")
    feature_prefix: str = Field("sr", description="Redis key prefix of the online trainer's feature store")
    poll_interval: float = Field(60.0, ge=0.05, description="seconds between parameter-server polls")
    first_poll_wait_s: float = Field(15.0, ge=0, description="a starting worker (the first, or one replacing a "
                                     "killed worker) accepts requests once it has a model (failed polls are retried "
                                     "every 0.25 s) or the parameter server has none, or after this long: it answers "
                                     "from a model, not 503, when its siblings can")
    # which tables serve: rows are [vector | scalars]; the first item scalar is the item bias
    user_table: str = "bpr_users"
    item_table: str = "bpr_items"
    knn_blob: str = Field("refit/item-knn/neighbors", description="item-kNN neighbour lists blob")
    ranker_blob: str = Field("refit/ranker", description="ranking-model blob")
    catalogue_blob: str = Field("catalogue/items", description="item catalogue blob (streamrec catalogue publish)")
    experiments_file: Path | None = Field(None, description="online experiments (YAML, streamrec.serving.experiments), "
                                          "re-read when it changes")
    impressions: Literal["auto", "on", "off"] = Field("auto", description="log what each /recommend showed to "
                                                      "impressions_topic; auto: when an experiments file is set")
    impressions_topic: str = "streamrec.events.impressions"
    impressions_flush_s: float = Field(0.2, gt=0, description="seconds between a worker's sends of its queued "
                                       "impressions (batched: a send per answer would cost the requests' time)")
    max_pending_impressions: int = Field(100_000, ge=1, description="impressions a worker queues while the broker "
                                         "is unreachable; beyond, the oldest are dropped and counted")
    item_rules: str = Field("", description="business rules every /recommend obeys, as filter parameters in one "
                            "query string, e.g. 'exclude=in_stock:false&range=stock:1..' (streamrec.serving.filters)")
    item_catalogue: Path | None = Field(None, description="u.item or item_id,title,genres CSV for the console")
    metrics_sources: dict[str, str] = Field(default_factory=dict,
                                            description="other processes' /metrics URLs the console aggregates")
    # POST /events (feedback): where accepted events go, and how long an event id is remembered
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_client: Literal["kafka-python", "confluent"] = "kafka-python"
    topic: str = "streamrec.events"
    dlq_suffix: str = ".dlq"
    topic_partitions: int = Field(3, ge=1, description="partitions of the topics serving creates before it "
                                  "produces (events, dead letters, impressions) when they do not exist yet")
    producer_acks: Literal["0", "1", "all"] = "all"
    producer_linger_ms: int = Field(5, ge=0)
    custom_event_types: list[str] = Field(default_factory=list)
    max_context_keys: int = Field(32, ge=0)
    max_context_bytes: int = Field(2048, ge=0)
    event_id_retention_s: int = Field(86_400, ge=1, description="how long a produced event id is answered "
                                                              "as a duplicate instead of produced again")
    produce_timeout_s: float = Field(10.0, gt=0, description="longest wait for the broker's acknowledgement; "
                                                             "503 after it")
    produce_retry_after_s: float = Field(2.0, gt=0, description="Retry-After of a 503 from POST /events; a worker "
                                                                "whose broker failed answers 503 at once this long")
    # users: a bounded cache of the requested users' rows (streamrec.serving.users), not a table mirror
    user_cache_size: int = Field(100_000, ge=1, description="users whose rows a worker keeps (LRU); ~4 * (dim + "
                                                            "scalars) + 200 bytes each: 100k at dim 64 ~ 45 MB")
    user_pull_timeout_s: float = Field(0.1, gt=0, description="longest wait for a missing user's row")
    user_pull_retry_s: float = Field(1.0, ge=0, description="pull no rows this long after a failed pull")
    user_pull_on_events: bool = Field(True, description="pull a cached user's row again when the feature store "
                                      "counts events of theirs since the last pull (read-your-writes: a user in a "
                                      "session gets the row the trainer has now, not the last poll's)")
    user_pull_interval_s: float = Field(0.1, ge=0, description="while a pulled row has not learned the user's "
                                        "newest event (the trainer writes a batch's features while it learns the "
                                        "batch), a request pulls it again at most this often")
    user_pull_lag_s: float = Field(30.0, ge=0, description="after the count grows, rows that lag it are pulled "
                                   "again for at most this long (a stopped trainer: the poll takes over)")
    # candidate generation
    ann_candidates: int = Field(200, ge=1)
    knn_recent: int = Field(10, ge=0, description="recent items whose neighbours become candidates")
    knn_per_item: int = Field(20, ge=0)
    trending_candidates: int = Field(50, ge=0)
    trending_cache_s: float = Field(1.0, ge=0, description="how long a worker reuses the trending list")
    # index
    index: Literal["auto", "flat", "ivf"] = Field("auto", description="auto: IVF from ivf_min_items items")
    ivf_min_items: int = Field(50_000, ge=1)
    nprobe: int = Field(16, ge=1)
    rebuild_fraction: float = Field(0.25, gt=0, description="rebuild the index when a delta touches more")
    search_memo_mb: float = Field(8.0, ge=0, description="bound on the single-query index answers each of a "
                                  "worker's two buffers keeps (LRU), emptied by every index change; an answer of "
                                  "200 candidates takes ~3.2 kB (0: off)")
    # exploration (streamrec.serving.explore)
    explore_share: float = Field(0.0, ge=0.0, le=1.0, description="share of the k slots given to fresh items "
                                 "chosen by Thompson sampling; an arm's `explore` overrides it")
    explore_max_age_s: float = Field(172_800.0, gt=0, description="fresh: first seen less than this long ago "
                                     "(event time)")
    explore_min_impressions: int = Field(100, ge=0, description="fresh: shown fewer times than this")
    explore_pool: int = Field(1000, ge=1, description="the newest fresh items a worker draws from")
    explore_prior: float = Field(10.0, gt=0, description="strength, in impressions, of the Beta prior centred on "
                                 "the pool's click-through rate")
    explore_candidates: int = Field(5, ge=0, description="Thompson sampling draws among the eligible fresh items "
                                    "the user's vector scores highest, this many (0: among all of them)")
    explore_refresh_s: float = Field(1.0, gt=0, description="how often a worker re-reads the fresh items' counts")
    explore_seed: int | None = Field(None, description="seed of the exploration draws; None: unseeded")
    # users without a row but with events: their recent items' mean vector (fold-in)
    fold_in_events: int = Field(5, ge=0, description="a user without a row is served from the mean vector of up "
                                "to this many of their most recent items (0: off)")
    fold_in_weight: float = Field(2.0, gt=0, description="scale of that mean vector against the items' biases "
                                  "(chosen on validation splits by `streamrec study-cold-users`)")
    # users with a row: their current session joins it, as the online model scores them
    session_weight: float = Field(SESSION_WEIGHT, ge=0, description="weight of the mean vector of the user's "
                                  "current session's items added to their row, faded by their events as "
                                  "session_fade says (the online BPR's own `session_weight`; 0: off)")
    session_fade: float = Field(SESSION_FADE, ge=0, description="the weight is session_weight * fade / (fade + the "
                                "user's events) (the online BPR's `session_fade`; 0: no fade)")
    session_items: int = Field(SESSION_ITEMS, ge=1, description="the newest items of the session that count (the online "
                               "BPR's `session_items`)")
    session_gap: float = Field(SESSION_GAP, gt=0, description="seconds of event time after a user's last event "
                               "that end their session (the feature store's and the online BPR's `session_gap`)")
    # context slices for users without a row (streamrec.serving.context)
    context_slices: bool = Field(True, description="serve users without a row from the popularity slices of "
                                 "their request's context (device, hour) where those have proven useful")
    context_pool: int = Field(200, ge=1, description="items read per context slice")
    context_prior: float = Field(100.0, ge=0, description="events at which a slice's own popularity and the "
                                 "global one weigh the same")
    context_refresh_s: float = Field(5.0, gt=0, description="how often a worker re-reads the context slices")
    # degradation
    redis_timeout_s: float = Field(0.1, gt=0)
    redis_retry_s: float = Field(1.0, ge=0, description="skip Redis this long after a failure")

    @property
    def logs_impressions(self) -> bool:
        return self.impressions == "on" or (self.impressions == "auto" and self.experiments_file is not None)

    @field_validator("param_server_token", "api_token")
    @classmethod
    def _secret_given(cls, value: str | None) -> str | None:
        return secret_or_none(value)

    @field_validator("item_rules")
    @classmethod
    def _rules_parse(cls, rules: str) -> str:
        """A malformed rule stops `streamrec serve` at start, not every request later."""
        ItemFilter.parse_rules(rules)
        return rules

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> ServingConfig:
        base = {"param_servers": settings.param_servers, "param_server_token": settings.param_server_token,
                "api_token": settings.api_token,
                "redis_url": settings.redis_url, "redis_cluster": settings.redis_cluster,
                "poll_interval": settings.poll_interval,
                "feature_prefix": settings.feature_prefix, "metrics_sources": settings.metrics_sources,
                "item_catalogue": settings.item_catalogue, "item_rules": settings.item_rules,
                "experiments_file": settings.experiments_file, "impressions": settings.impressions,
                "impressions_topic": settings.impressions_topic,
                "kafka_bootstrap": settings.kafka_bootstrap, "kafka_client": settings.kafka_client,
                "topic": settings.topic, "dlq_suffix": settings.dlq_suffix,
                "topic_partitions": settings.topic_partitions, "producer_acks": settings.producer_acks,
                "producer_linger_ms": settings.producer_linger_ms,
                "custom_event_types": settings.custom_event_types, "max_context_keys": settings.max_context_keys,
                "max_context_bytes": settings.max_context_bytes,
                "event_id_retention_s": settings.event_id_retention_s, "explore_share": settings.explore_share,
                "explore_max_age_s": settings.explore_max_age_s,
                "explore_min_impressions": settings.explore_min_impressions,
                "explore_candidates": settings.explore_candidates}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_env(cls) -> ServingConfig:
        raw = os.environ.get(CONFIG_ENV)
        if not raw:
            raise RuntimeError(f"{CONFIG_ENV} is not set: start workers with `streamrec serve`")
        return cls.model_validate_json(raw)
