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
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor

from .routing import MODALITY_NAMES, RouterScores, one_hot, top_choices

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


def router_losses(
    scores: RouterScores,
    modality: Tensor | None,
    modality_names: Sequence[str],
    min_experts: Sequence[float],
    scope: str,
    valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """Raw aux losses of a router's ``RouterScores``: the classic ones over ``scope`` (``all``
    tokens, key ``"<loss>"``, or each ``modality``, key ``"<loss>/<modality_names[m]>"``), the
    entropy ones per modality, with S = ``min_experts[m]`` (one entry applies to all; without
    a modality the tokens form one group that uses ``min_experts[0]`` and plain keys). Tokens
    not ``valid`` (padding) belong to no group. Groups are masks, so no step waits on the
    device."""
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


@dataclass(frozen=True)
class RouterLosses:
    """The auxiliary losses of a MoE layer and their weights: the config's
    ``model.moe.losses`` node. A weight >= 0; 0 switches a loss off.

    ``importance_weight``, ``load_weight`` and ``vmoe_load_weight`` may be None: the router's
    ``balance_weight`` then applies to V-MoE's importance and load losses and 0 to Switch's
    load loss (``for_router``). ``scope`` is the group the classic losses balance: ``all``
    routed tokens (V-MoE, the LIMoE paper) or each ``modality`` alone; LIMoE's entropy losses
    are always per modality, the global one with S = ``global_entropy_min_experts`` (one
    number, or one per modality of ``modality_names``).
    """

    importance_weight: float | None = None
    load_weight: float | None = None
    vmoe_load_weight: float | None = None
    z_loss_weight: float = 0.0
    local_entropy_weight: float = 0.01
    global_entropy_weight: float = 0.01
    global_entropy_min_experts: float | Sequence[float] = (2.0, 2.0)
    scope: str = "all"
    modality_names: Sequence[str] = MODALITY_NAMES

    def __post_init__(self) -> None:
        if self.scope not in LOSS_SCOPES:
            raise ValueError(f"model.moe.losses.scope must be one of {LOSS_SCOPES}, got "
                             f"{self.scope!r}")  # fmt: skip
        for name in LOSS_NAMES:
            weight = getattr(self, f"{name}_weight")
            if weight is not None and (isinstance(weight, bool) or not weight >= 0):
                raise ValueError(f"model.moe.losses.{name}_weight must be >= 0, got {weight!r}")
        names = tuple(self.modality_names)
        given = self.global_entropy_min_experts
        values = (float(given),) if isinstance(given, int | float) else tuple(given)
        if len(values) not in (1, len(names)) or any(s <= 0 for s in values):
            raise ValueError(
                f"model.moe.losses.global_entropy_min_experts must be a number > 0 or one per "
                f"modality {names}, got {given}"
            )
        object.__setattr__(self, "modality_names", names)
        object.__setattr__(self, "global_entropy_min_experts", values)

    @property
    def min_experts(self) -> tuple[float, ...]:
        """S per modality id (one entry: the same S for all), as checked when built."""
        return self.global_entropy_min_experts

    @cached_property
    def weights(self) -> dict[str, float]:
        """Each loss's weight by ``LOSS_NAMES`` (None where the router's default applies)."""
        return {name: getattr(self, f"{name}_weight") for name in LOSS_NAMES}

    def for_router(self, balance_weight: float) -> RouterLosses:
        """These losses with the unset balancing weights filled in: ``balance_weight`` (the
        router's) for V-MoE's importance and load losses, 0 for Switch's load loss."""
        unset = {"importance": balance_weight, "load": 0.0, "vmoe_load": balance_weight}
        filled = {f"{n}_weight": w for n, w in unset.items() if self.weights[n] is None}
        return replace(self, **filled)

    def check(self, num_experts: int) -> None:
        """With the global entropy loss on, S <= 1 never fires (log S <= 0 <= H) and
        S > num_experts can never be met (H <= log E): either is a config mistake."""
        if self.global_entropy_weight > 0 and any(
            not 1 < s <= num_experts for s in self.min_experts
        ):
            raise ValueError(
                f"model.moe.losses.global_entropy_min_experts must be in (1, num_experts="
                f"{num_experts}] while global_entropy_weight > 0, got {list(self.min_experts)}"
            )

    def __call__(
        self, scores: RouterScores, modality: Tensor | None, valid: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The raw losses of one routing (``router_losses``), keyed ``<loss>[/<modality>]``."""
        return router_losses(
            scores, modality, self.modality_names, self.min_experts, self.scope, valid
        )

    def total(self, aux_losses: Mapping[str, Tensor]) -> Tensor:
        """The weighted sum the trainer adds to its loss (``weighted_sum``)."""
        return weighted_sum(aux_losses, self.weights)
