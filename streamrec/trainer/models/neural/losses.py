"""Ranking losses shared by the retrieval and sequence models.

`sampled_softmax` with the log-Q correction (Bengio & Senecal; Yi et al. 2019): when negatives
are drawn from a proposal q instead of uniformly, subtracting log q from every logit makes the
sampled softmax a consistent estimate of the full softmax (without it, popular items, sampled
more often, are pushed down too hard).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class LogQSampler:
    """Draws negatives from q ~ count^alpha and knows log q of every item."""

    def __init__(self, counts: np.ndarray, alpha: float, seed: int) -> None:
        weights = np.power(np.maximum(counts.astype(np.float64), 1e-12), alpha)
        weights[counts <= 0] = 0.0
        self.q = weights / weights.sum()
        self.log_q = torch.as_tensor(np.log(np.maximum(self.q, 1e-30)), dtype=torch.float32)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.as_tensor(self.rng.choice(len(self.q), size=n, p=self.q), device=device)


def sampled_softmax(
    user_vecs: torch.Tensor, pos: torch.Tensor, sampled: torch.Tensor, item_vecs: torch.Tensor,
    item_bias: torch.Tensor | None, log_q: torch.Tensor | None,
) -> torch.Tensor:
    """Cross entropy of the positive against negatives shared by the batch (accidental hits masked).

    `item_vecs`/`item_bias` are the full output tables; `log_q` (per item) enables the correction,
    applied to the positive and the sampled logits alike.
    """
    logits_pos = (user_vecs * item_vecs[pos]).sum(-1, keepdim=True)
    logits_neg = user_vecs @ item_vecs[sampled].T
    if item_bias is not None:
        logits_pos = logits_pos + item_bias[pos][:, None]
        logits_neg = logits_neg + item_bias[sampled][None, :]
    if log_q is not None:
        log_q = log_q.to(user_vecs.device)
        logits_pos = logits_pos - log_q[pos][:, None]
        logits_neg = logits_neg - log_q[sampled][None, :]
    logits_neg = logits_neg.masked_fill(sampled[None, :] == pos[:, None], float("-inf"))
    logits = torch.cat([logits_pos, logits_neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=logits.device))


def in_batch_softmax(logits: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the batch's own targets (B x B logits, positives on the diagonal).

    Other rows whose target is the same item are accidental hits and are masked out.
    """
    if log_q is not None:
        logits = logits - log_q.to(logits.device)[targets][None, :]
    same = targets[None, :] == targets[:, None]
    logits = logits.masked_fill(same & ~torch.eye(len(targets), dtype=torch.bool, device=logits.device), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(targets), device=logits.device))


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_pos - r_neg), averaged over valid (row, negative) pairs."""
    loss = -F.logsigmoid(pos[:, None] - neg)
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def top1_loss(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GRU4Rec's TOP1: sigmoid(r_neg - r_pos) + sigmoid(r_neg^2) (the second term regularises)."""
    loss = torch.sigmoid(neg - pos[:, None]) + torch.sigmoid(neg**2)
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def bpr_max_loss(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor, reg: float) -> torch.Tensor:
    """GRU4Rec's BPR-max (Hidasi & Karatzoglou 2018): -log sum_j s_j sigmoid(r_pos - r_j) +
    reg * sum_j s_j r_j^2, with s = softmax over the row's valid negatives. Weighting the negatives
    by their own scores focuses the update on the ones ranked high, which is what keeps the loss
    from vanishing when there are many negatives (plain BPR averages them out)."""
    masked = neg.masked_fill(valid == 0, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(masked, dim=1))  # a row without valid negatives: all 0
    ranked = (weights * torch.sigmoid(pos[:, None] - neg)).sum(dim=1)
    loss = -torch.log(ranked + 1e-24) + reg * (weights * neg**2).sum(dim=1)
    has = valid.sum(dim=1) > 0
    return loss[has].mean() if has.any() else loss.sum() * 0.0


def cross_entropy_loss(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sampled softmax of each row's positive against its valid candidates: columns holding the
    row's own item (accidental hits, `valid` 0) are masked, so the positive is counted once."""
    logits = torch.cat([pos[:, None], neg.masked_fill(valid == 0, float("-inf"))], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=pos.device))
