"""GRU4Rec's published recipe: BPR-max and sampled-softmax losses, and sessions that exist."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamrec.stream.synthetic import synthetic_log
from streamrec.trainer.evaluation.splits import distinct_pairs, leave_last_out
from streamrec.trainer.evaluation.topn import ranking_metrics
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models import create
from streamrec.trainer.models.neural.losses import bpr_max_loss, cross_entropy_loss


def test_bpr_max_focuses_on_the_highest_scored_negative() -> None:
    pos = torch.tensor([2.0], requires_grad=True)
    neg = torch.tensor([[3.0, -5.0]], requires_grad=True)
    bpr_max_loss(pos, neg, torch.ones(1, 2), reg=0.0).backward()
    assert neg.grad[0, 0] > 0 and abs(float(neg.grad[0, 1])) < 1e-2 * float(neg.grad[0, 0])
    assert float(pos.grad[0]) < 0  # raising the positive lowers the loss
    assert torch.isfinite(bpr_max_loss(pos, neg, torch.zeros(1, 2), reg=1.0))  # no valid negative: 0, not NaN


def test_cross_entropy_masks_accidental_hits() -> None:
    scores = torch.tensor([[1.0, 5.0, 0.0], [0.0, 1.0, 0.0]])
    valid = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])  # row 0's column 1 is the same item
    expected = -torch.log_softmax(torch.tensor([1.0, 0.0]), 0)[0] / 2 - torch.log_softmax(scores[1], 0)[1] / 2
    assert float(cross_entropy_loss(scores, valid)) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("loss", ["bpr-max", "cross-entropy"])
def test_gru4rec_learns_a_log_without_sessions(loss: str) -> None:
    """Users who come back days apart have no sessions at the default gap: GRU4Rec reads whole
    histories instead of learning nothing, and ranks far above popularity on planted groups."""
    log = synthetic_log(events=6000, users=400, items=200, affinity=0.85, seed=2)
    data = Interactions.from_log(distinct_pairs(log), implicit=True)
    train, test = leave_last_out(data)
    users, items = data.user_idx[test], data.item_idx[test]
    model = create("gru4rec", loss=loss, epochs=8, popularity_blend=0).fit(data.subset(train))
    assert np.isinf(model.dims["session_gap"])
    popularity = ranking_metrics(create("popularity").fit(data.subset(train)), users, items)["hr@10"]
    assert ranking_metrics(model, users, items)["hr@10"] > popularity + 0.1
