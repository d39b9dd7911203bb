"""Routing: router logits -> top-k choices -> expert slots (capacity, Batch Priority Routing).

Everything here works on flat token sets ``[N, ...]`` and never builds dense
``[N, E, C]`` one-hot tensors: slot positions come from a stable sort by expert,
as in MegaBlocks, so memory is O(N * k) whatever the number of experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The modalities LIMoE routes together, in the order of their ids (image 0, text 1).
MODALITY_NAMES: tuple[str, ...] = ("image", "text")


@dataclass
class Routing:
    """What the router decided for one MoE layer call; the trainer logs and sums it.

    ``gates`` are the combine weights actually used (raw softmax probabilities of
    the chosen experts, or those renormalised over the top-k); dropped choices
    keep their gate here but contribute nothing to the output.
    """

    expert_index: Tensor  # [N, k] long, choice 0 = top-1
    gates: Tensor  # [N, k] float32
    dropped: Tensor  # [N, k] bool, True where the choice exceeded its expert's capacity
    probs: Tensor  # [N, E] float32 router softmax (after noise when noisy gating was on)
    modality: Tensor | None  # [N] long, or None
    capacity: int | None  # per-expert capacity; None = dropless
    aux_losses: dict[str, Tensor]  # raw, unweighted scalars: "<loss>/<modality>" or "<loss>"
    aux_loss: Tensor  # scalar: weighted sum of aux_losses (what the trainer adds to its loss)
    # Who chose: "topk" and "soft" (tokens, k choices each) or "expert_choice" (experts pick
    # tokens: a token's E choices are requests only, and a token no expert picked is dropped).
    router: str = "topk"


def compute_capacity(
    num_tokens: int,
    num_experts: int,
    top_k: int = 1,
    capacity_factor: float | None = 1.0,
    multiple_of: int = 4,
) -> int | None:
    """Per-expert capacity C = ceil(k * cf * N / E), rounded up to a multiple of ``multiple_of``.

    This is vmoe's ``compute_capacity`` (with ``num_tokens = N * k``). Returns None
    (dropless) when ``capacity_factor`` is None and 0 when there are no tokens. The
    raw value is rounded to 9 decimals before the ceiling so float noise such as
    ``1.1 * 10 = 11.000000000000002`` does not add a whole slot.
    """
    if capacity_factor is None:
        return None
    if num_tokens == 0:
        return 0
    raw = top_k * capacity_factor * num_tokens / num_experts
    capacity = math.ceil(round(raw, 9))
    return capacity + (-capacity) % multiple_of


def add_gating_noise(logits: Tensor, num_experts: int) -> Tensor:
    """V-MoE noisy gating: Gaussian noise of std 1/E on the router logits (training only)."""
    return logits + torch.randn_like(logits) / num_experts


def route(logits: Tensor, top_k: int, renormalize: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Router logits [N, E] -> (probs [N, E], gates [N, k], expert_index [N, k]), in float32.

    Softmax then top-k (V-MoE order, so gates are probabilities over all E experts);
    with ``renormalize`` the k gates of each token are rescaled to sum to 1, as in
    Mixtral/ST-MoE top-2. Renormalisation ignores drops: a token whose second choice
    is dropped still weighs its first choice by its renormalised gate.

    A renormalised top-1 gate is p / p = 1 whatever the router says, which would leave the
    router no gradient from the task loss. It is computed as p / stop_gradient(p) instead:
    its value is exactly 1, and the router gets the gradient of the plain gate p scaled by
    1 / p, bounded at any sharpness (Switch's straight-through view of the gate).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    gates, expert_index = top_choices(probs, top_k)
    if renormalize:
        total = gates.sum(dim=-1, keepdim=True)
        gates = gates / (total.detach() if top_k == 1 else total)
    return probs, gates, expert_index


def top_choices(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(values, indices)`` of the k largest scores of each row, largest first; k = 1 takes
    ``max``, several times faster than ``topk`` on CPU for the few experts of a row."""
    if k == 1:
        return scores.max(dim=-1, keepdim=True)
    return torch.topk(scores, k, dim=-1)


def service_order(priority: Tensor | None, num_tokens: int, device: torch.device) -> Tensor:
    """Order in which tokens claim slots within one choice rank.

    ``priority=None`` keeps token order; otherwise tokens with the highest priority
    (Batch Priority Routing: the top-1 router probability) go first, ties broken by
    token index thanks to the stable sort.
    """
    if priority is None:
        return torch.arange(num_tokens, device=device)
    return torch.sort(priority, descending=True, stable=True).indices


def assign_slots(
    expert_index: Tensor,
    num_experts: int,
    capacity: int | None,
    priority: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Slot position of every choice in its expert's buffer, and whether it was dropped.

    Choices are served rank by rank (all top-1 choices before any top-2 choice, as
    in V-MoE), and within a rank in ``service_order(priority)``. A choice's position
    is the number of choices served before it that go to the same expert; it is
    dropped when position >= capacity (never when ``capacity`` is None).
    Returns ``(position [N, k] long, dropped [N, k] bool)``.
    """
    num_tokens, top_k = expert_index.shape
    order = service_order(priority, num_tokens, expert_index.device)
    # Flatten in service order: rank-major, then tokens in priority order.
    served = expert_index[order].t().reshape(-1)
    # Position within an expert = rank of the choice among that expert's choices.
    by_expert = torch.sort(served, stable=True)
    counts = torch.bincount(served, minlength=num_experts)
    starts = torch.cumsum(counts, dim=0) - counts
    ranks = torch.arange(served.numel(), device=served.device) - starts[by_expert.values]
    served_position = torch.empty_like(served)
    served_position[by_expert.indices] = ranks
    position = torch.empty_like(expert_index)
    position[order] = served_position.view(top_k, num_tokens).t()
    if capacity is None:
        dropped = torch.zeros_like(expert_index, dtype=torch.bool)
    else:
        dropped = position >= capacity
    return position, dropped


def expert_choice(probs: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Expert-choice routing (Zhou et al., 2022): each expert takes its ``capacity`` tokens of
    highest router probability, so loads are balanced by construction and a token is served
    by 0 to E experts.

    Returned in the shape of top-k routing with k = E, so the rest of the layer (dispatch,
    statistics) needs no special case: token i's choices are all E experts in order of its
    own probability, ``gates`` their probabilities, ``position`` the slot an expert gave it
    and ``dropped`` where that expert did not pick it. Returns ``(expert_index [N, E],
    gates [N, E], position [N, E], dropped [N, E])``.
    """
    num_tokens, num_experts = probs.shape
    gates, expert_index = torch.sort(probs, dim=-1, descending=True, stable=True)
    picks = min(capacity, num_tokens)
    # Expert e's picks: tokens by descending probs[:, e] (ties to the lower index).
    picked = torch.sort(probs.t(), dim=-1, descending=True, stable=True).indices[:, :picks]
    slot = torch.full((num_tokens, num_experts), capacity, dtype=torch.long, device=probs.device)
    slot_ids = torch.arange(picks, device=probs.device).expand(num_experts, picks)
    expert_ids = torch.arange(num_experts, device=probs.device)[:, None].expand(-1, picks)
    slot[picked, expert_ids] = slot_ids  # slot[token, expert]
    position = slot.gather(1, expert_index)
    return expert_index, gates, position, position >= capacity
