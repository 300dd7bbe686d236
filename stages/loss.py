"""The 1000-way softmax cross-entropy when the logits are sharded across towers, and top-k accuracy.

With fc8 split, tower t holds logits of classes [offset_t, offset_t + n_t). The loss needs only two
numbers per image from each tower — the log-sum-exp of its logits and the target's logit if the
target is one of its classes — so the towers exchange a (b, 2) tensor, not the (b, 1000) logits:

    L = mean_i( logsumexp_t(lse_t,i) − Σ_t target_logit_t,i )

An empty shard (fc8 wholly on tower 0) contributes lse = −inf and target logit 0, so one function
serves both layouts. Every tower computes the same L; with the exchange's backward summing the
towers' gradients (reduce-scatter), each tower must backpropagate L / towers (see `tower_loss`).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.tower import Exchange


def sharded_cross_entropy(logits: Tensor, target: Tensor, class_offset: int, exchange: Exchange) -> Tensor:
    """Mean cross-entropy over all classes; `logits` (b, n) are this tower's classes from `class_offset`."""
    n = logits.shape[1]
    lse = torch.logsumexp(logits, dim=1)  # (b,), −inf when n == 0
    local = target - class_offset
    mine = (local >= 0) & (local < n)
    if n > 0:
        picked = logits.gather(1, local.clamp(0, n - 1).unsqueeze(1)).squeeze(1)
        target_logit = torch.where(mine, picked, torch.zeros_like(picked))
    else:
        target_logit = torch.zeros_like(lse)
    stats = exchange(torch.stack([lse, target_logit], dim=1))  # (b, 2·towers)
    return (torch.logsumexp(stats[:, 0::2], dim=1) - stats[:, 1::2].sum(dim=1)).mean()


def tower_loss(loss: Tensor, towers: int) -> Tensor:
    """What each of `towers` processes backpropagates so that the summed gradients are ∂L."""
    return loss / towers


def cross_entropy_reference(logits: Tensor, target: Tensor) -> Tensor:
    """The reference network's loss over its gathered (b, 1000) logits."""
    return F.cross_entropy(logits, target)


def local_exchange(x: Tensor) -> Tensor:
    """The exchange of a process that holds every tower's shard: nothing to gather."""
    return x


def topk_correct(logits: Tensor, target: Tensor, topk: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have the target among the k largest logits, for each k (all classes here)."""
    return sharded_topk_correct(logits, target, 0, local_exchange, topk)


@torch.no_grad()
def sharded_view_average(logits: Tensor, views: int, exchange: Exchange) -> Tensor:
    """(b·views, n) logits of each view → (b, n) log of the softmax averaged over the views
    (the paper's 10-view test, §4.1); with one view, the log-softmax. Sharded like the loss."""
    lse = exchange(torch.logsumexp(logits, dim=1, keepdim=True))  # (b·views, towers)
    log_probs = logits - torch.logsumexp(lse, dim=1, keepdim=True)
    if views == 1:
        return log_probs
    # the image count, not -1: a tower with no classes (the 2012 code's fc8 on tower 0) has
    # (b·views, 0) logits, which no -1 could be inferred from
    images = logits.shape[0] // views
    return log_probs.reshape(images, views, logits.shape[1]).logsumexp(dim=1) - math.log(views)


@torch.no_grad()
def sharded_target_value(values: Tensor, target: Tensor, class_offset: int, exchange: Exchange) -> Tensor:
    """(b, n) per-class values of this tower's classes → (b,) each row's value at its target class."""
    n = values.shape[1]
    local = target - class_offset
    mine = (local >= 0) & (local < n)
    picked = values.new_zeros(values.shape[0])
    if n > 0:
        picked = torch.where(mine, values.gather(1, local.clamp(0, n - 1).unsqueeze(1)).squeeze(1), picked)
    return exchange(picked.unsqueeze(1)).sum(dim=1)


@torch.no_grad()
def sharded_topk_correct(logits: Tensor, target: Tensor, class_offset: int, exchange: Exchange,
                         topk: tuple[int, ...] = (1, 5), weights: Tensor | None = None) -> list[float]:
    """Top-k hits over all classes when each tower holds a shard of the logits (any scores that
    rank classes, e.g. averaged log-probabilities), optionally weighted per row.

    Each tower sends its own k best (value, class) pairs, padded with −inf for a shard narrower than
    k, and every tower picks the k best of all towers' candidates.
    """
    k, b, n = max(topk), logits.shape[0], logits.shape[1]
    values = logits.new_full((b, k), float("-inf"))
    classes = logits.new_full((b, k), -1.0)
    if n > 0:
        best = logits.topk(min(k, n), dim=1)
        values[:, :best.values.shape[1]] = best.values
        classes[:, :best.indices.shape[1]] = (best.indices + class_offset).to(logits.dtype)
    candidates = exchange(torch.cat([values, classes], dim=1))  # (b, towers·2k)
    candidates = candidates.reshape(b, -1, 2, k)
    values, classes = candidates[:, :, 0].reshape(b, -1), candidates[:, :, 1].reshape(b, -1)
    top = classes.gather(1, values.topk(k, dim=1).indices)  # (b, k), best first
    hits = top == target.unsqueeze(1).to(top.dtype)
    if weights is None:
        return [int(hits[:, :kk].any(dim=1).sum()) for kk in topk]
    return [float((hits[:, :kk].any(dim=1).to(weights.dtype) * weights).sum()) for kk in topk]
