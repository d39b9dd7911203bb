"""Soft MoE (Puigcerver et al., 2023): every expert slot is a weighted average of a group's
tokens, and every token a weighted average of the slot outputs; no token is dropped and
no discrete choice is made.

Tokens arrive as a flat set with a ``group`` id each (a sequence: one image's patches, one
caption's tokens). Averages never cross groups: mixing tokens of different pairs would let
an image embedding see another pair's caption. Groups are packed into a padded
``[G, L, dim]`` batch so dispatch and combine are batched matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import Experts


class SoftRouter(nn.Module):
    """Slot logits as vmoe's ``SoftRouter``: ``scale * <x / |x|, mu_s / |mu_s|>``.

    Both the tokens and the slot parameters are L2-normalised and one learned scalar sets the
    logits' sharpness. Without the normalisation the logits grow with the residual stream's
    norm, which rises with depth, and the dispatch softmax collapses onto a few tokens; the
    paper (Puigcerver et al., 2023, section 2.3) found this matters most at large widths.
    ``weight [num_slots, dim]`` holds ``mu`` (one row per slot, expert-major).
    """

    def __init__(self, dim: int, num_slots: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_slots, dim))
        self.scale = nn.Parameter(torch.ones(()))
        self.eps = eps
        # LeCun normal, as vmoe: unit-norm rows on average, so eps is negligible.
        nn.init.normal_(self.weight, std=dim**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        """Slot logits ``[N, num_slots]`` in float32 for tokens ``x [N, dim]``."""
        x = _unit(x.float(), self.eps)
        mu = _unit(self.weight.float(), self.eps)
        return self.scale.float() * F.linear(x, mu)


def _unit(x: Tensor, eps: float) -> Tensor:
    """``x / sqrt(|x|^2 + eps)`` along the last axis (vmoe's ``normalize``)."""
    return x * torch.rsqrt(x.square().sum(dim=-1, keepdim=True) + eps)


def pack_groups(group: Tensor, num_tokens: int) -> tuple[Tensor, Tensor, int, int]:
    """``(group_of_row, row_in_group, G, L)``: where each token sits in a ``[G, L]`` padded
    batch; ``group=None``-style single groups pass ``torch.zeros(N)``. Group ids are made
    dense (ids that are absent take no row)."""
    ids, dense = torch.unique(group, return_inverse=True)
    order = torch.sort(dense, stable=True).indices
    sizes = torch.bincount(dense, minlength=ids.numel())
    starts = torch.cumsum(sizes, 0) - sizes
    row = torch.empty_like(dense)
    row[order] = torch.arange(num_tokens, device=group.device) - starts[dense[order]]
    return dense, row, ids.numel(), int(sizes.max()) if num_tokens else 0


def soft_moe(
    x: Tensor, logits: Tensor, group: Tensor | None, experts: Experts, slots_per_expert: int
) -> tuple[Tensor, Tensor]:
    """Soft MoE over ``x [N, dim]`` with slot logits ``[N, E * slots_per_expert]``.

    Dispatch weights are a softmax over each group's tokens (per slot), combine weights a
    softmax over the slots (per token). Returns ``(y [N, dim] float32, expert_probs [N, E])``
    where ``expert_probs`` sums a token's combine weights per expert: how much of its
    output each expert wrote, the counterpart of a router's probabilities.
    """
    num_tokens, dim = x.shape
    num_slots = logits.shape[-1]
    if group is None:
        group = torch.zeros(num_tokens, dtype=torch.long, device=x.device)
    g, row, num_groups, length = pack_groups(group, num_tokens)
    padded = x.new_zeros(num_groups, length, dim)
    padded[g, row] = x
    slot_logits = logits.new_full((num_groups, length, num_slots), float("-inf"))
    slot_logits[g, row] = logits
    dispatch = torch.softmax(slot_logits, dim=1).nan_to_num(0.0)  # over tokens; pads get 0
    combine = torch.softmax(slot_logits, dim=-1).nan_to_num(0.0)  # over slots; pads get 0
    slots = torch.einsum("gls,gld->gsd", dispatch, padded.float())  # [G, S, dim]
    # Expert-major rows: expert e's slots of every group form one contiguous slice.
    num_experts = experts.num_experts
    per_expert = slots.view(num_groups, num_experts, slots_per_expert, dim).transpose(0, 1)
    counts = torch.full((num_experts,), num_groups * slots_per_expert, device=x.device)
    out = experts(per_expert.reshape(-1, dim), counts).float()
    out = out.view(num_experts, num_groups, slots_per_expert, dim).transpose(0, 1)
    y = torch.einsum("gls,gsd->gld", combine, out.reshape(num_groups, num_slots, dim))[g, row]
    expert_probs = combine[g, row].view(num_tokens, num_experts, slots_per_expert).sum(-1)
    return y, expert_probs
