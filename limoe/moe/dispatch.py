"""Dispatch and combine: permute kept choices into per-expert contiguous slices and back.

The MegaBlocks / ScatterMoE recipe: sort the kept (token, choice) pairs by expert,
gather their token rows, run each expert on its contiguous slice, and scatter the
gate-weighted results back with ``index_add_``. No ``[N, E, C]`` one-hots, and a
dropped choice simply never enters the permutation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sort_by_expert(
    expert_index: Tensor, dropped: Tensor, num_experts: int
) -> tuple[Tensor, Tensor]:
    """Flat indices (into ``expert_index.view(-1)``) of kept choices, grouped by expert.

    Returns ``(choice_index [M], counts [E])``: expert e's choices are the slice
    ``counts[:e].sum() : counts[:e + 1].sum()`` of ``choice_index``, in token order
    (stable sort), so results are deterministic.
    """
    kept = (~dropped).reshape(-1).nonzero().squeeze(-1)
    experts = expert_index.reshape(-1)[kept]
    order = torch.sort(experts, stable=True).indices
    counts = torch.bincount(experts, minlength=num_experts)
    return kept[order], counts


def gather_tokens(x: Tensor, choice_index: Tensor, top_k: int) -> Tensor:
    """Rows of ``x [N, dim]`` for the sorted choices: choice c belongs to token c // k.

    ``index_select``, not ``x[...]``: its backward is an ``index_add_``, where advanced
    indexing's is an accumulating ``index_put_``, several times slower on CPU."""
    return x.index_select(0, choice_index // top_k)


def combine(
    expert_out: Tensor, choice_index: Tensor, gates: Tensor, num_tokens: int, top_k: int
) -> Tensor:
    """y_i = sum of gate * expert output over token i's kept choices, via ``index_add_``.

    Accumulates in at least float32 (gates are float32, and summing top-k
    contributions in bf16 loses precision); the caller casts to the input dtype.
    """
    weights = gates.reshape(-1).index_select(0, choice_index).unsqueeze(-1)
    weighted = expert_out * weights
    out = weighted.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add_(0, choice_index // top_k, weighted)
