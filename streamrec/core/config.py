"""One place for configuration: defaults < infra state file < env vars (STREAMREC_*) < CLI flags.

`streamrec infra up` writes the addresses of the broker and Redis it started into
`$STREAMREC_HOME/infra.json`; every other command reads them from there unless the environment or a
flag says otherwise, so a user never has to copy addresses around.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_HOME = Path.home() / ".streamrec"
IMPRESSIONS_SUFFIX = ".impressions"
ITEMS_SUFFIX = ".items"
INFRA_STATE_FILE = "infra.json"


def home_dir() -> Path:
    """The state directory, honouring STREAMREC_HOME without building a full Settings."""
    import os

    return Path(os.environ.get("STREAMREC_HOME", str(DEFAULT_HOME))).expanduser()


def read_infra_state(home: Path | None = None) -> dict[str, Any]:
    """What `infra up` recorded, or {} when nothing is running."""
    path = (home or home_dir()) / INFRA_STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"infra state file {path} is unreadable: {exc}") from exc


def masked_url(url: str) -> str:
    """`url` with its password replaced by ***, for anything printed or logged (redis://:pw@host)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6 literal
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


class _InfraStateSource(PydanticBaseSettingsSource):
    """Addresses written by `streamrec infra up`; below env vars, above defaults."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        state = read_infra_state()
        return {k: state[k] for k in ("kafka_bootstrap", "redis_url") if state.get(k)}


class Settings(BaseSettings):
    """Every tunable of every streamrec process. Env var: STREAMREC_<FIELD NAME IN CAPITALS>."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_", extra="forbid")

    home: Path = Field(DEFAULT_HOME, description="state directory (infra.json, logs, checkpoints)")
    # Kafka
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="bootstrap servers, host:port[,..]")
    kafka_client: Literal["kafka-python", "confluent"] = Field(
        "kafka-python", description="client backend; 'confluent' needs the [fast] extra"
    )
    topic: str = Field("streamrec.events", description="interaction events topic")
    dlq_suffix: str = Field(".dlq", description="dead-letter topic = <topic><suffix>")
    producer_acks: Literal["0", "1", "all"] = Field(
        "all", description="producer acks; 'all' also turns on idempotent delivery"
    )
    producer_linger_ms: int = Field(5, ge=0, description="producer batching delay")
    topic_partitions: int = Field(3, ge=1, description="partitions for topics streamrec creates")
    consumer_group: str = Field("streamrec-trainer", description="online trainer consumer group")
    session_timeout_ms: int = Field(6000, ge=1000, description="consumer group session timeout")
    heartbeat_interval_ms: int = Field(1000, ge=100, description="consumer heartbeat interval")
    fetch_wait_ms: int = Field(
        50, ge=0, le=10_000, description="longest a consumer's fetch waits at the broker for new records "
        "(the clients' default, 500, delays a quiet stream's events by ~250 ms on the embedded broker)"
    )
    spark_master: str = Field(
        "local[2]", description="Spark master of `--engine spark` refits, evaluations and tuning (local[N], spark://host:port)")
    # Events
    custom_event_types: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="event types accepted beside the built-in ones"
    )
    max_context_keys: int = Field(32, ge=0, description="most keys in an event's context")
    max_context_bytes: int = Field(2048, ge=0, description="most bytes of an event's context")
    # Redis
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="feature store")
    redis_cluster: bool = Field(False, description="the feature store is a Redis Cluster; redis_url names any of "
                                "its nodes (docs/operations.md, Redis Cluster)")
    feature_prefix: str = Field("sr", description="key prefix of the feature store in Redis")
    # Parameter server
    param_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:7070"], description="host:port of each shard, in order"
    )
    param_server_token: str | None = Field(None, repr=False, description="shared secret for every call")
    # Serving
    serving_port: int = Field(8000, description="HTTP port of the serving workers")
    api_token: str | None = Field(
        None, repr=False, description="bearer token the HTTP API asks for (all but /healthz, /readyz, /metrics)"
    )
    poll_interval: float = Field(60.0, ge=0.05, description="seconds between parameter pulls")
    event_id_retention_s: int = Field(
        86_400, ge=1, description="POST /events: how long an event id is remembered (Redis) against re-sends"
    )
    # Metrics
    metrics_port: int = Field(0, ge=0, description="Prometheus port for this process (0: none)")
    metrics_host: str = Field("127.0.0.1", description="address the Prometheus port binds (0.0.0.0: every interface)")
    item_catalogue: Path | None = Field(
        None, description="item titles and genres for the serving console: a MovieLens u.item or an "
        "item_id,title,genres CSV")
    experiments_file: Path | None = Field(
        None, description="online experiments for serving (YAML: experiments, layers, arms), re-read when it changes")
    impressions: Literal["auto", "on", "off"] = Field(
        "auto", description="serving logs what each /recommend showed to <topic>.impressions; auto: with experiments")
    item_rules: str = Field(
        "", description="business rules every /recommend obeys, as filter parameters in one query string, "
        "e.g. exclude=in_stock:false&range=stock:1.. (the published item catalogue's attributes)")
    explore_share: float = Field(
        0.0, ge=0.0, le=1.0, description="share of /recommend's slots given to fresh items by Thompson sampling "
        "(needs `train-online --explore`); an experiment arm's `explore` overrides it")
    explore_max_age_s: float = Field(
        172_800.0, gt=0, description="exploration: an item first seen less than this much event time ago is fresh")
    explore_min_impressions: int = Field(
        100, ge=0, description="exploration: an item shown fewer times is fresh whatever its age")
    explore_candidates: int = Field(
        5, ge=0, description="exploration: a user with a vector draws among the fresh items it scores highest, "
        "this many (0: among all fresh items)")
    metrics_sources: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="other processes' /metrics URLs the serving console aggregates: name=url,name=url (or JSON)",
    )

    @field_validator("param_server_token", "api_token")
    @classmethod
    def _secret_given(cls, value: str | None) -> str | None:
        return secret_or_none(value)

    @field_validator("custom_event_types", "param_servers", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                return json.loads(stripped)
            return [v.strip() for v in stripped.split(",") if v.strip()]
        return value

    @field_validator("metrics_sources", mode="before")
    @classmethod
    def _split_pairs(cls, value: object) -> object:
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("{"):
                return json.loads(stripped)
            pairs = [v.strip() for v in stripped.split(",") if v.strip()]
            if any("=" not in pair for pair in pairs):
                raise ValueError("metrics_sources: expected name=url pairs separated by commas")
            return dict(pair.split("=", 1) for pair in pairs)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _InfraStateSource(settings_cls))

    @property
    def dlq_topic(self) -> str:
        return self.topic + self.dlq_suffix

    @property
    def impressions_topic(self) -> str:
        """Where serving logs what each answer showed (streamrec.serving.impressions)."""
        return self.topic + IMPRESSIONS_SUFFIX

    @property
    def items_topic(self) -> str:
        """Item metadata changes, beside the events (streamrec.stream.catalogue_topic)."""
        return self.topic + ITEMS_SUFFIX

    def public_dict(self) -> dict[str, Any]:
        """The effective configuration, secrets masked, JSON-ready."""
        data = self.model_dump(mode="json")
        for secret in ("param_server_token", "api_token"):
            if data.get(secret):
                data[secret] = "***"
        data["redis_url"] = masked_url(self.redis_url)
        data["dlq_topic"] = self.dlq_topic
        data["impressions_topic"] = self.impressions_topic
        data["items_topic"] = self.items_topic
        return data


def secret_or_none(value: str | None) -> str | None:
    """A token as given, or None for none, an empty or a blank one (compose passes
    `STREAMREC_API_TOKEN=` when `.env` names none). One reading for every check: the HTTP guard
    took "" as no token while the direct route took it as a token, and `streamrec serve` says at
    start when its API is open (`serving.cli.open_api_warning`), so a secret store that handed
    over nothing is seen."""
    return value if value is not None and value.strip() else None


def load_settings(**overrides: object) -> Settings:
    """Settings with CLI overrides applied (None means 'not given on the command line')."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
