"""What each event type means to the online models: positive, negative (skip) or explicit rating,
and how much a positive weighs (by type, and by value for watch time as YouTube weights by it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class EventRoles:
    positive_weights: dict[str, float] = field(default_factory=lambda: {
        "view": 1.0, "click": 1.0, "like": 2.0, "rating": 1.0, "purchase": 3.0, "watch": 1.0,
    })
    negative_types: frozenset[str] = frozenset({"skip"})
    rating_types: frozenset[str] = frozenset({"rating"})
    value_weighted_types: frozenset[str] = frozenset({"watch"})
    value_unit: float = 60.0  # a watch of this many seconds weighs 1 x the type weight

    @cached_property
    def positive_types(self) -> frozenset[str]:
        """Event types that count as positives (weight > 0)."""
        return frozenset(kind for kind, weight in self.positive_weights.items() if weight > 0)

    def positive_weight(self, event_type: np.ndarray, value: np.ndarray) -> np.ndarray:
        """Weight of each event as a positive (0 for non-positive types)."""
        types = np.asarray(event_type, dtype=object)
        weights = np.zeros(len(types))
        for kind, weight in self.positive_weights.items():
            weights[types == kind] = weight
        for kind in self.value_weighted_types:
            mask = (types == kind) & np.isfinite(value)
            scale = np.log1p(np.maximum(value[mask], 0.0)) / np.log1p(self.value_unit)
            weights[mask] *= np.clip(scale, 0.1, 5.0)
        return weights

    def is_negative(self, event_type: np.ndarray) -> np.ndarray:
        return np.isin(np.asarray(event_type, dtype=object), list(self.negative_types))

    def is_rating(self, event_type: np.ndarray, value: np.ndarray) -> np.ndarray:
        return np.isin(np.asarray(event_type, dtype=object), list(self.rating_types)) & np.isfinite(value)
