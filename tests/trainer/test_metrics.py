import numpy as np
import pytest

from streamrec.trainer.evaluation import metrics as m

RECOMMENDED = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
RELEVANT = {3, 7, 15, 22, 25}


def test_survey_example():
    assert m.precision_at_k(RECOMMENDED, RELEVANT, 10) == pytest.approx(0.3)
    assert m.recall_at_k(RECOMMENDED, RELEVANT, 10) == pytest.approx(0.6)
    assert m.hit_rate_at_k(RECOMMENDED, RELEVANT, 10) == 1.0
    dcg = 1 / np.log2(3) + 1 / np.log2(5) + 1 / np.log2(9)
    idcg = sum(1 / np.log2(r + 1) for r in range(1, 6))
    assert m.ndcg_at_k(RECOMMENDED, RELEVANT, 10) == pytest.approx(dcg / idcg)
    assert m.average_precision_at_k(RECOMMENDED, RELEVANT, 10) == pytest.approx((1 / 2 + 2 / 4 + 3 / 8) / 3)
    assert m.mrr([RECOMMENDED, [2, 4]], [RELEVANT, {4}]) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m.map_at_k([RECOMMENDED], [RELEVANT], 10) == pytest.approx(0.4583333)


def test_graded_ndcg():
    gains = {"a": 3, "b": 1}
    dcg = (2**1 - 1) / np.log2(2) + (2**3 - 1) / np.log2(3)
    idcg = (2**3 - 1) / np.log2(2) + (2**1 - 1) / np.log2(3)
    assert m.ndcg_at_k(["b", "a", "c"], gains, 3) == pytest.approx(dcg / idcg)


def test_error_and_beyond_accuracy_metrics():
    assert m.rmse(np.array([1.0, 3.0]), np.array([2.0, 5.0])) == pytest.approx(np.sqrt(2.5))
    assert m.mae(np.array([1.0, 3.0]), np.array([2.0, 5.0])) == pytest.approx(1.5)
    assert m.catalogue_coverage(np.array([[0, 1], [1, 2]]), 6) == pytest.approx(0.5)
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert m.intra_list_diversity(np.array([[0, 1]]), vectors) == pytest.approx(1.0)
    assert m.intra_list_diversity(np.array([[0, 2]]), vectors) == pytest.approx(0.0)
    assert m.novelty(np.array([[0]]), np.array([25, 1]), 100) == pytest.approx(2.0)


def test_ties_are_expected_values_under_random_order():
    scores = np.array([[5.0, 3.0, 3.0, 3.0, 1.0]])  # target item 2 ties with items 1 and 3
    greater, ties = m.rank_counts(scores, np.array([2]))
    assert (greater[0], ties[0]) == (1, 2)  # rank uniform on {2, 3, 4}
    assert m.expected_hit(greater, ties, 2)[0] == pytest.approx(1 / 3)
    assert m.expected_hit(greater, ties, 3)[0] == pytest.approx(2 / 3)
    expected = np.mean([1 / np.log2(r + 1) for r in (2, 3, 4)])
    assert m.expected_ndcg(greater, ties, 10)[0] == pytest.approx(expected)
    assert m.expected_ndcg(greater, ties, 2)[0] == pytest.approx((1 / np.log2(3)) / 3)
    assert m.expected_reciprocal_rank(greater, ties)[0] == pytest.approx(np.mean([1 / 2, 1 / 3, 1 / 4]))
    untied = m.rank_counts(np.array([[0.1, 0.9, -np.inf]]), np.array([0]))
    assert m.expected_hit(*untied, 1)[0] == 0.0 and m.expected_hit(*untied, 2)[0] == 1.0
