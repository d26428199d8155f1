"""Prometheus metrics of the event stream, shared by every process that validates events."""

from __future__ import annotations

from prometheus_client import Counter

EVENTS_ACCEPTED = Counter(
    "streamrec_stream_events_accepted_total",
    "Records that passed validation, by the component that validated them",
    ["component"],
)
EVENTS_DEAD_LETTERED = Counter(
    "streamrec_stream_events_dead_lettered_total",
    "Records sent to the dead-letter topic, by component and reason code",
    ["component", "reason"],
)
EVENTS_PRODUCED = Counter(
    "streamrec_stream_events_produced_total",
    "Events written to the interaction topic, by component",
    ["component"],
)
