"""Maximal marginal relevance (Carbonell & Goldstein; recsys survey's formula):

    pick argmax over unchosen d of  lambda * rel(d) - (1 - lambda) * max over chosen s of sim(d, s)

rel is the candidates' score min-max normalised to [0, 1] (so it is on the scale of the cosine
similarities it is traded against); sim is the cosine of the item vectors; for the first pick the
max over the empty set counts as 0. lambda = 1 is pure relevance.
"""

from __future__ import annotations

import numpy as np


def normalise(scores: np.ndarray) -> np.ndarray:
    low, high = float(scores.min()), float(scores.max())
    if high - low <= 0:
        return np.ones_like(scores, dtype=np.float64)
    return (scores - low) / (high - low)


def mmr(scores: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the k picks in order, their MMR values). Greedy over k, vectorised over candidates."""
    n = len(scores)
    k = min(k, n)
    relevance = lam * normalise(np.asarray(scores, np.float64))
    unit = np.asarray(vectors, np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    max_sim = np.zeros(n)
    available = np.ones(n, bool)
    picks, values = np.empty(k, np.int64), np.empty(k)
    for step in range(k):
        value = np.where(available, relevance - (1.0 - lam) * max_sim, -np.inf)
        pick = int(np.argmax(value))
        picks[step], values[step] = pick, value[pick]
        available[pick] = False
        sim = unit @ unit[pick]
        max_sim = sim if step == 0 else np.maximum(max_sim, sim)
    return picks, values
