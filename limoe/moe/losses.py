"""Auxiliary router losses (V-MoE, Switch, ST-MoE, LIMoE), each over one token group.

All take float32 router statistics for the tokens of one group (one modality, or
all tokens) and return a scalar; an empty group gives 0, never NaN, because a
batch may hold no text (or no image) tokens in some layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

LOSS_NAMES = ("importance", "load", "z_loss", "local_entropy", "global_entropy")


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last dim; clamped log so p = 0 gives 0 and finite grads."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


def importance_loss(probs: Tensor) -> Tensor:
    """V-MoE importance loss: squared coefficient of variation of imp_e = sum_i p_ie.

    Uses the population std (``correction=0``), as vmoe's ``jnp.std``; so it is 0
    for perfectly balanced importance and for E = 1.
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    importance = probs.sum(dim=0)
    return (importance.std(correction=0) / importance.mean()) ** 2


def load_loss(probs: Tensor, top1: Tensor) -> Tensor:
    """Switch/GShard load balancing: E * sum_e f_e * P_e.

    f_e is the fraction of tokens whose top-1 choice is e (not differentiable),
    P_e the mean router probability of e; equals 1 when both are uniform.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.new_zeros(())
    fraction = torch.bincount(top1, minlength=num_experts).to(probs.dtype) / num_tokens
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean_i logsumexp(logits_i)^2, keeps router logits small."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return (torch.logsumexp(logits, dim=-1) ** 2).mean()


def local_entropy_loss(probs: Tensor) -> Tensor:
    """LIMoE local entropy: mean_i H(p_i); minimising it makes each token's routing confident."""
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return entropy(probs).mean()


def global_entropy_loss(probs: Tensor, min_experts: float) -> Tensor:
    """LIMoE thresholded global entropy: max(0, tau + Omega), Omega = -H(mean_i p_i), tau = log S.

    Zero once the group's average routing is spread like >= S uniformly used
    experts; below that it pushes the group to use more experts (no collapse).
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return torch.relu(math.log(min_experts) - entropy(probs.mean(dim=0)))


def group_losses(
    logits: Tensor, probs: Tensor, top1: Tensor, min_experts: float
) -> dict[str, Tensor]:
    """All five losses for one token group, keyed by ``LOSS_NAMES``."""
    return {
        "importance": importance_loss(probs),
        "load": load_loss(probs, top1),
        "z_loss": z_loss(logits),
        "local_entropy": local_entropy_loss(probs),
        "global_entropy": global_entropy_loss(probs, min_experts),
    }


def compute_aux_losses(
    logits: Tensor,
    probs: Tensor,
    expert_index: Tensor,
    modality: Tensor | None = None,
    modality_names: Sequence[str] = ("image", "text"),
    min_experts: Sequence[float] = (1.0,),
) -> dict[str, Tensor]:
    """Raw aux losses, per modality when ``modality [N]`` is given.

    Keys are ``"<loss>/<modality_names[m]>"`` with a modality, ``"<loss>"`` without.
    ``min_experts`` holds S for each modality id (one entry applies to all); without
    a modality the tokens form one group that uses ``min_experts[0]``.
    """
    logits, probs, top1 = logits.float(), probs.float(), expert_index[:, 0]
    if modality is None:
        return group_losses(logits, probs, top1, min_experts[0])
    losses = {}
    for m, name in enumerate(modality_names):
        mask = modality == m
        s = min_experts[m] if len(min_experts) > 1 else min_experts[0]
        for key, value in group_losses(logits[mask], probs[mask], top1[mask], s).items():
            losses[f"{key}/{name}"] = value
    return losses


def weighted_sum(aux_losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """sum of weights[loss name] * value over all keys ("<loss>" or "<loss>/<modality>")."""
    device = next(iter(aux_losses.values())).device
    total = torch.zeros((), device=device)
    for key, value in aux_losses.items():
        weight = weights[key.split("/")[0]]
        if weight != 0:  # skip, so a zero-weighted loss adds no graph and no NaN risk
            total = total + weight * value
    return total
