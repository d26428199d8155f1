"""MMR against a hand-computed case of the formula lambda * rel - (1 - lambda) * max sim."""

from __future__ import annotations

import numpy as np
import pytest

from streamrec.serving.mmr import mmr


def test_mmr_hand_computed() -> None:
    # scores 1.0, 0.9, 0.5 -> rel (min-max) 1.0, 0.8, 0.0; a and b are the same direction, c orthogonal
    scores = np.array([1.0, 0.9, 0.5])
    vectors = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    # lambda 0.5: pick a (0.5 * 1.0 = 0.5); then b: 0.5 * 0.8 - 0.5 * 1 = -0.1, c: 0.5 * 0 - 0.5 * 0 = 0.0 -> c;
    # then b: 0.4 - 0.5 * max(1, 0) = -0.1
    picks, values = mmr(scores, vectors, 3, 0.5)
    assert picks.tolist() == [0, 2, 1]
    assert values.tolist() == pytest.approx([0.5, 0.0, -0.1])
    # lambda 0.9: after a, b: 0.72 - 0.1 = 0.62 beats c: 0.0
    picks, values = mmr(scores, vectors, 3, 0.9)
    assert picks.tolist() == [0, 1, 2] and values.tolist() == pytest.approx([0.9, 0.62, 0.0])
    # lambda 1: pure relevance
    assert mmr(scores, vectors, 2, 1.0)[0].tolist() == [0, 1]
