"""Soft MoE (Puigcerver et al., 2023): every expert slot is a weighted average of a group's
tokens, and every token a weighted average of the slot outputs; no token is dropped and
no discrete choice is made.

Tokens arrive as a flat set with a ``group`` id each (a sequence: one image's patches, one
caption's tokens). Averages never cross groups: mixing tokens of different pairs would let
an image embedding see another pair's caption. Groups are packed into a padded
``[G, L, dim]`` batch so dispatch and combine are batched matmuls.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import Experts
from .routing import Router, RouterOutput, RouterScores


class SoftRouter(Router):
    """Soft MoE's router: slot logits as vmoe's ``SoftRouter``,
    ``scale * <x / |x|, mu_s / |mu_s|>``, then dispatch and combine weights (``soft_weights``)
    within each sequence of each modality. Nothing is chosen or dropped; for the record and
    the statistics, a token's one choice is the expert that wrote most of its output (that
    share as its gate), and the losses read the per-expert shares as probabilities.

    Both the tokens and the slot parameters are L2-normalised and one learned scalar sets the
    logits' sharpness. Without the normalisation the logits grow with the residual stream's
    norm, which rises with depth, and the dispatch softmax collapses onto a few tokens; the
    paper (Puigcerver et al., 2023, section 2.3) found this matters most at large widths.
    ``weight [num_experts * slots_per_expert, dim]`` holds ``mu`` (one row per slot,
    expert-major).
    """

    name = "soft"
    capacity = "ignored"
    mixes = True

    def __init__(
        self, dim: int, num_experts: int, slots_per_expert: int = 1, eps: float = 1e-6
    ) -> None:
        super().__init__(num_experts)
        if not isinstance(slots_per_expert, int) or slots_per_expert < 1:
            raise ValueError(
                f"model.moe.router.slots_per_expert must be an integer >= 1, got "
                f"{slots_per_expert!r}"
            )
        self.slots_per_expert = slots_per_expert
        self.weight = nn.Parameter(torch.empty(num_experts * slots_per_expert, dim))
        self.scale = nn.Parameter(torch.ones(()))
        self.eps = eps
        # LeCun normal, as vmoe: unit-norm rows on average, so eps is negligible.
        nn.init.normal_(self.weight, std=dim**-0.5)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}"

    def logits(self, x: Tensor) -> Tensor:
        """Slot logits ``[N, num_slots]`` in float32 for tokens ``x [N, dim]``."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = _unit(x.float(), self.eps)
            mu = _unit(self.weight.float(), self.eps)
            return self.scale.float() * F.linear(x, mu)

    def forward(
        self, x: Tensor, modality: Tensor | None, sequence: Tensor | None,
        capacity_factor: float | None, valid: Tensor | None = None,
    ) -> RouterOutput:  # fmt: skip
        group = sequence
        if sequence is not None and modality is not None:  # an image and its caption differ
            group = modality * x.shape[0] + sequence  # sequence < N: no two keys collide
        logits = self.logits(x)
        if valid is not None:  # padding: in no slot's average, and given no output
            logits = torch.where(valid.unsqueeze(1), logits, float("-inf"))
        mixing = soft_weights(logits, group, self.slots_per_expert)
        probs = mixing.expert_probs()
        gates, expert_index = probs.max(dim=-1, keepdim=True)
        return RouterOutput(
            expert_index=expert_index, gates=gates,
            dropped=torch.zeros_like(expert_index, dtype=torch.bool), probs=probs,
            mixing=mixing, scores=RouterScores(None, probs, None, expert_index),
        )  # fmt: skip


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


class SoftMixing(NamedTuple):
    """Soft MoE's weights for one call, on the ``[G, L]`` padded batch of token groups."""

    dispatch: Tensor  # [G, L, S] softmax over each group's tokens, per slot (pads 0)
    combine: Tensor  # [G, L, S] softmax over the slots, per token (pads 0)
    group_of_row: Tensor  # [N] each token's group
    row_in_group: Tensor  # [N] its row in that group
    slots_per_expert: int

    def expert_probs(self) -> Tensor:
        """``[N, E]``: a token's combine weights summed per expert, how much of its output
        each expert wrote (the counterpart of a router's probabilities)."""
        per_token = self.combine[self.group_of_row, self.row_in_group]
        return per_token.view(per_token.shape[0], -1, self.slots_per_expert).sum(-1)


def soft_weights(logits: Tensor, group: Tensor | None, slots_per_expert: int) -> SoftMixing:
    """Dispatch and combine weights of slot logits ``[N, E * slots_per_expert]`` whose tokens
    belong to ``group`` (None: one group). Averages never cross groups."""
    num_tokens, num_slots = logits.shape
    if group is None:
        group = torch.zeros(num_tokens, dtype=torch.long, device=logits.device)
    g, row, num_groups, length = pack_groups(group, num_tokens)
    slot_logits = logits.new_full((num_groups, length, num_slots), float("-inf"))
    slot_logits[g, row] = logits
    dispatch = torch.softmax(slot_logits, dim=1).nan_to_num(0.0)  # over tokens; pads get 0
    combine = torch.softmax(slot_logits, dim=-1).nan_to_num(0.0)  # over slots; pads get 0
    return SoftMixing(dispatch, combine, g, row, slots_per_expert)


def soft_apply(x: Tensor, mixing: SoftMixing, experts: Experts) -> Tensor:
    """Slots as weighted averages of each group's tokens -> experts -> tokens as weighted
    averages of the slot outputs. Returns ``y [N, dim]`` in float32."""
    dim = x.shape[1]
    g, row = mixing.group_of_row, mixing.row_in_group
    num_groups, length, num_slots = mixing.dispatch.shape
    padded = x.new_zeros(num_groups, length, dim)
    padded[g, row] = x
    slots = torch.einsum("gls,gld->gsd", mixing.dispatch, padded.float())  # [G, S, dim]
    # Expert-major rows: expert e's slots of every group form one contiguous slice.
    num_experts, per = experts.num_experts, mixing.slots_per_expert
    per_expert = slots.view(num_groups, num_experts, per, dim).transpose(0, 1)
    offsets = torch.arange(1, num_experts + 1, device=x.device) * (num_groups * per)
    rows = per_expert.reshape(-1, dim)
    out = experts(rows, offsets, experts.gemm_path(rows, None)).float()
    out = out.view(num_experts, num_groups, per, dim).transpose(0, 1)
    mixed = torch.einsum("gls,gsd->gld", mixing.combine, out.reshape(num_groups, num_slots, dim))
    return mixed[g, row]
