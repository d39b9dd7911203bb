"""Auxiliary router losses (V-MoE, Switch, ST-MoE, LIMoE), each over one token group.

All take float32 router statistics for the tokens of one group (one modality, or
all tokens) and return a scalar; an empty group gives 0, never NaN, because a
batch may hold no text (or no image) tokens in some layer.

The classic losses balance experts: V-MoE's importance (clean probabilities) and load (noisy
top-k threshold, normal CDF), Switch/GShard's load and ST-MoE's z-loss. Their group is the
``scope``: ``all`` routed tokens of the batch, as V-MoE and the LIMoE paper, or each
``modality`` on its own. LIMoE's entropy losses are always per modality.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .routing import one_hot, top_choices

LOSS_NAMES = ("importance", "load", "vmoe_load", "z_loss", "local_entropy", "global_entropy")
CLASSIC_LOSSES = ("importance", "load", "vmoe_load", "z_loss")
LOSS_SCOPES = ("all", "modality")


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last dim; clamped log so p = 0 gives 0 and finite grads."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation, var / mean^2 with the population variance (vmoe's
    ``jnp.var``): 0 for equal values and for a single one, and no undefined std gradient;
    0 for all-zero values (an empty group), with a finite gradient."""
    return values.var(correction=0) / (values.mean() ** 2).clamp_min(torch.finfo(values.dtype).tiny)


def group_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Mean over the tokens (dim 0) of a group given as 0/1 ``weight [N]`` (None: all
    tokens); 0 for an empty group. A mask, not a boolean index: nothing waits on the device."""
    if weight is None:
        return values.mean(dim=0) if values.shape[0] else values.new_zeros(values.shape[1:])
    w = weight.to(values.dtype)
    total = (values * w.view(-1, *([1] * (values.dim() - 1)))).sum(dim=0)
    return total / w.sum().clamp_min(1)


def importance_loss(probs: Tensor, weight: Tensor | None = None) -> Tensor:
    """V-MoE importance loss: CV^2 of imp_e = sum_i p_ie, over the clean (noise-free) router
    probabilities, as vmoe computes it (CV^2 is the same of sums and of means)."""
    return cv_squared(group_mean(probs, weight))


# Beyond this |z| the normal CDF is 0 or 1 to float32 (its density below 1e-22): clamping there
# keeps the V-MoE load loss and its gradient and spares ``exp`` its slow path on a CPU.
NDTR_RANGE = 10.0


def vmoe_load_loss(
    clean_logits: Tensor,
    noisy_logits: Tensor,
    noise_std: float,
    top_k: int,
    weight: Tensor | None = None,
) -> Tensor:
    """V-MoE load loss (vmoe's ``_load_auxiliary_loss``): CV^2 over experts of the mean
    probability that a token would pick the expert if its noise were drawn again.

    The threshold of a token is its k-th largest noisy logit; expert e clears it with
    probability 1 - Phi((threshold - clean_e) / noise_std). Defined only with gating noise:
    0 without (``noise_std`` 0), as vmoe leaves it out of a deterministic router.
    """
    if clean_logits.shape[0] == 0 or noise_std == 0:
        return clean_logits.new_zeros(())
    threshold = top_choices(noisy_logits, top_k)[0][:, -1:]
    z = ((clean_logits - threshold) / noise_std).clamp(-NDTR_RANGE, NDTR_RANGE)
    above = torch.special.ndtr(z)  # 1 - Phi(-x) = Phi(x)
    return cv_squared(group_mean(above, weight))


def load_loss(probs: Tensor, top1: Tensor, weight: Tensor | None = None) -> Tensor:
    """Switch/GShard load balancing: E * sum_e f_e * P_e.

    f_e is the fraction of tokens whose top-1 choice is e (not differentiable),
    P_e the mean router probability of e; equals 1 when both are uniform.
    """
    num_experts = probs.shape[1]
    fraction = group_mean(one_hot(top1, num_experts, probs.dtype), weight)
    return num_experts * (fraction * group_mean(probs, weight)).sum()


def z_loss(logits: Tensor, probs: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean_i logsumexp(logits_i)^2, keeps router logits small.

    Given ``probs = softmax(logits)``, logsumexp is read off the largest logit and its
    probability (lse = l_max - log p_max, p_max >= 1/E), with no second pass of ``exp``."""
    if probs is None:
        lse = torch.logsumexp(logits, dim=-1)
    else:
        p_max, index = probs.max(dim=-1, keepdim=True)
        lse = (logits.gather(-1, index) - p_max.log()).squeeze(-1)
    return group_mean(lse**2, weight)


def local_entropy_loss(probs: Tensor, weight: Tensor | None = None) -> Tensor:
    """LIMoE local entropy: mean_i H(p_i); minimising it makes each token's routing confident."""
    return group_mean(entropy(probs), weight)


def global_entropy_loss(probs: Tensor, min_experts: float, weight: Tensor | None = None) -> Tensor:
    """LIMoE thresholded global entropy: max(0, tau + Omega), Omega = -H(mean_i p_i), tau = log S.

    Zero once the group's average routing is spread like >= S uniformly used
    experts; below that it pushes the group to use more experts (no collapse). 0 for an
    empty group.
    """
    loss = torch.relu(math.log(min_experts) - entropy(group_mean(probs, weight)))
    if weight is None:
        return loss if probs.shape[0] else loss * 0
    return torch.where(weight.any(), loss, 0.0)


class RouterScores(NamedTuple):
    """What the losses read of one routing: ``logits`` and ``probs`` [N, E] as routed (noisy
    while training), ``clean_logits`` before the noise, the k choices ``expert_index``
    [N, k] and the noise's std (0 without noise). A router without per-expert logits (Soft
    MoE's probabilities are shares of each token's output) gives None for both logits: its
    importance loss reads ``probs``, and the z-loss and V-MoE load loss, defined on logits,
    are 0."""

    logits: Tensor | None
    probs: Tensor
    clean_logits: Tensor | None
    expert_index: Tensor
    noise_std: float = 0.0


def classic_losses(scores: RouterScores, weight: Tensor | None = None) -> dict[str, Tensor]:
    """The balancing losses of one token group (``weight``, see ``group_mean``), keyed by
    ``CLASSIC_LOSSES``."""
    top_k = scores.expert_index.shape[-1]
    losses = {"load": load_loss(scores.probs, scores.expert_index[:, 0], weight)}
    if scores.logits is None:
        zero = scores.probs.new_zeros(())
        return {"importance": importance_loss(scores.probs, weight), **losses,
                "vmoe_load": zero, "z_loss": zero}  # fmt: skip
    clean, noisy = scores.clean_logits, scores.logits
    return {
        "importance": importance_loss(torch.softmax(clean, dim=-1), weight),
        **losses,
        "vmoe_load": vmoe_load_loss(clean, noisy, scores.noise_std, top_k, weight),
        "z_loss": z_loss(scores.logits, scores.probs, weight),
    }


def entropy_losses(
    probs: Tensor, min_experts: float, weight: Tensor | None = None
) -> dict[str, Tensor]:
    """LIMoE's two losses of one modality."""
    return {
        "local_entropy": local_entropy_loss(probs, weight),
        "global_entropy": global_entropy_loss(probs, min_experts, weight),
    }


def compute_aux_losses(
    logits: Tensor | None,
    probs: Tensor,
    expert_index: Tensor,
    modality: Tensor | None = None,
    modality_names: Sequence[str] = ("image", "text"),
    min_experts: Sequence[float] = (1.0,),
    clean_logits: Tensor | None = None,
    noise_std: float = 0.0,
    scope: str = "modality",
) -> dict[str, Tensor]:
    """Raw aux losses: the classic ones over ``scope`` (``all`` tokens, key ``"<loss>"``, or
    each ``modality``, key ``"<loss>/<modality_names[m]>"``), the entropy ones per modality.

    ``clean_logits`` are the logits before gating noise of std ``noise_std`` (None: no
    noise). ``min_experts`` holds S for each modality id (one entry applies to all); without
    a modality the tokens form one group that uses ``min_experts[0]`` and plain keys.
    """
    if logits is not None:
        logits = logits.float()
        clean_logits = logits if clean_logits is None else clean_logits.float()
    scores = RouterScores(logits, probs.float(), clean_logits, expert_index, noise_std)
    return router_losses(scores, modality, modality_names, min_experts, scope)


def router_losses(
    scores: RouterScores,
    modality: Tensor | None,
    modality_names: Sequence[str],
    min_experts: Sequence[float],
    scope: str,
    valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """``compute_aux_losses`` of a router's ``RouterScores``; tokens not ``valid`` (padding)
    belong to no group. Groups are masks, so no step waits on the device."""
    if scope not in LOSS_SCOPES:
        raise ValueError(f"loss_scope must be one of {LOSS_SCOPES}, got {scope!r}")
    probs = scores.probs
    if modality is None:
        return {**classic_losses(scores, valid), **entropy_losses(probs, min_experts[0], valid)}
    losses = classic_losses(scores, valid) if scope == "all" else {}
    for m, name in enumerate(modality_names):
        mask = modality == m if valid is None else (modality == m) & valid
        s = min_experts[m] if len(min_experts) > 1 else min_experts[0]
        own = entropy_losses(probs, s, mask)
        if scope == "modality":
            own = {**classic_losses(scores, mask), **own}
        losses.update({f"{key}/{name}": value for key, value in own.items()})
    return losses


def weighted_sum(aux_losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """sum of weights[loss name] * value over all keys ("<loss>" or "<loss>/<modality>")."""
    if not aux_losses:
        return torch.zeros(())
    device = next(iter(aux_losses.values())).device
    total = torch.zeros((), device=device)
    for key, value in aux_losses.items():
        weight = weights[key.split("/")[0]]
        if weight != 0:  # skip, so a zero-weighted loss adds no graph and no NaN risk
            total = total + weight * value
    return total
