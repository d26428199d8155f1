"""Response shapes for the OpenAPI document (handlers encode with orjson; tests validate against
these models so the document cannot drift from the wire)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Error(BaseModel):
    detail: str


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendedItem(ScoredItem):
    sources: list[str]  # "ann", "item_knn", "trending", "explore" (cold start: "context", "trending" or "prior")
    dot: float | None = None  # explain=true: p_u . q_i
    bias: float | None = None  # explain=true: b_i (+ b_u)
    knn_score: float | None = None  # explain=true: best kNN similarity to a recent item
    popularity: float | None = None  # explain=true: decayed popularity (trending candidates)
    mmr: float | None = None  # explain=true and diversity > 0: the MMR value when picked


class Explain(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    candidates: dict[str, int]  # candidates per source before the union
    union: int
    seen_filtered: int
    lambda_: float = Field(alias="lambda", description="MMR weight of relevance: 1 - diversity")
    ranker: str | None


class RecommendResponse(BaseModel):
    user_id: str
    items: list[RecommendedItem]
    cold_start: bool
    # "redis": the feature store could not be read; "param_server": the user is not cached and the
    # parameter server did not answer, so the user is served as unknown (cold start)
    degraded: list[str]
    model_version: int | None
    staleness_seconds: float | None
    request_id: str  # joins feedback to this answer (an event's context.request_id)
    experiment: str | None  # the first experiment the user is in (file order), None outside every one
    arm: str | None
    experiments: dict[str, str]  # every experiment the user is in (one per layer) -> its arm
    explain: Explain | None = None
    # a user without a row served from context slices: the slices used (e.g. "daypart=2", "device=ios")
    context: list[str] | None = None
    # a user without a row served from the mean vector of their recent items: how many it took
    fold_in: int | None = None
    # a user with a row whose current session joined it (as the online model scores them): its items used
    session: int | None = None


class RescoreResponse(BaseModel):
    user_id: str
    items: list[ScoredItem]
    unknown: list[str]
    cold_start: bool
    degraded: list[str]  # "param_server" as in RecommendResponse
    model_version: int
    staleness_seconds: float | None


class SimilarResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    item_knn: list[ScoredItem] | None
    model_version: int
    staleness_seconds: float | None


class Health(BaseModel):
    alive: bool
    pid: int


class Ready(BaseModel):
    ready: bool
    pid: int
    model_version: int | None
    synced_version: int  # the parameter-server version the last successful poll reached (0: none yet)
    staleness_seconds: float | None
    synced_at: float | None
    loaded_at: float | None
    index_items: int
    index_kind: str | None
    users: int  # rows of the user table at the parameter server (last poll)
    cached_users: int  # users whose rows this worker holds (at most user_cache_size)
    artifacts: dict[str, int]
    refused_artifacts: dict[str, str] = {}  # blobs published but not decodable here, by name: why
    inert_rules: list[str] = []  # configured item rules the published catalogue cannot apply, with why
    last_error: str | None
    explore_reads: int | None = None  # reads of the exploration pool so far (None: this worker does not explore)
    context_reads: int | None = None  # reads of the context slices so far (None: context slices are off)


class FeedbackEvent(BaseModel):
    """One interaction, as the trainer's schema takes it (streamrec.stream.events.EventSchema: that
    schema decides; this model only documents it). Without `timestamp` the event happened when the
    server received it; without `event_id` the server assigns one and returns it."""

    event_id: str | None = Field(None, max_length=256, description="idempotency key: re-sends are not produced twice")
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    event_type: str = Field(description="view, click, like, rating, purchase, watch, skip, or a configured custom type")
    value: float | None = Field(None, description="e.g. the rating")
    timestamp: float | None = Field(None, description="event time, epoch seconds (default: when received)")
    context: dict[str, str | int | float] | None = Field(None, description="at most 32 keys, 2 KiB as JSON")


class RejectedEvent(BaseModel):
    index: int  # position in the request (0 for a single event)
    reason: str  # e.g. missing_field:user_id, unknown_event_type
    detail: str


class EventsAccepted(BaseModel):
    """202: every valid event is on the topic (acknowledged by the broker), every invalid one on the
    dead-letter topic; accepted + dead_lettered = events sent."""

    accepted: int  # valid events: produced now or (duplicates) before
    produced: int
    duplicates: int  # event id already produced within the retention window (or repeated in this request)
    dead_lettered: int
    rejected: list[RejectedEvent]
    event_ids: list[str | None]  # per position: the event's id (assigned where absent), None where rejected
    deduplicated: bool  # False: Redis was unreachable, ids were not checked (the trainer still de-duplicates)
