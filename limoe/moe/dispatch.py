"""Dispatch and combine: permute the (token, choice) pairs into per-expert contiguous rows and
back, with shapes the host knows and no atomics.

The MegaBlocks / ScatterMoE recipe, in the form torchtitan and transformers use it:

1. ``sort_by_expert``: a stable sort of the N * k choices by expert; dropped choices take the
   key E and land past the last expert. Each expert's slice ends at ``offsets[e]``, found by
   ``searchsorted`` (no ``bincount``, ``nonzero`` or boolean mask: nothing waits for the
   device to say how many rows there are; there are always N * k).
2. ``gather_tokens``: each row takes its token through the sort's permutation.
3. the experts run on the rows (``Experts``), or on an ``[E, C]`` buffer at capacity
   (``slot_rows`` maps each row to its slot).
4. ``combine``: each choice takes its row back through the inverse permutation; a token sums
   its k gate-weighted choices over a ``[N, k, dim]`` view.

Both moves are ``MatchedGather``: a gather whose backward is the gather the other way,
through the inverse map, instead of the scatter-add (atomics on a GPU, run-to-run noise) that
autograd would make of ``index_select``. Rows past the last offset are never read: ``where``
masks them forward and backward, so garbage left there by a grouped GEMM cannot reach a result.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MatchedGather(torch.autograd.Function):
    """``out[i] = x[index[i]]`` (0 where ``index_valid[i]`` is False) for a partial bijection
    between x's rows and out's rows, given both ways: ``inverse[j]`` is the out row that x's
    row j went to (``inverse_valid[j]`` False: none). The gradient is then a gather too."""

    @staticmethod
    def forward(x, index, index_valid, inverse, inverse_valid):  # noqa: D102
        return _take(x, index, index_valid)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: D102
        _, _, _, inverse, inverse_valid = inputs
        ctx.save_for_backward(inverse, inverse_valid)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        inverse, inverse_valid = ctx.saved_tensors
        return _take(grad, inverse, inverse_valid), None, None, None, None


def _take(x: Tensor, index: Tensor, valid: Tensor | None) -> Tensor:
    rows = x.index_select(0, index)
    return rows if valid is None else torch.where(valid.unsqueeze(-1), rows, 0)


class ExpertBias(torch.autograd.Function):
    """``rows + bias[expert]``: each sorted row gets its expert's bias ``[E, H]``. The forward
    is a gather; the bias gradient is the one-hot GEMM ``onehot(expert)^T @ grad`` instead of
    the gather's scatter-add (atomics on a GPU). Rows of expert E (dropped) take the last
    expert's bias, which the caller masks, and give the bias no gradient."""

    @staticmethod
    def forward(rows, bias, expert):  # noqa: D102
        last = bias.shape[0] - 1
        return rows + bias.index_select(0, expert.clamp(max=last)).to(rows.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: D102
        ctx.save_for_backward(inputs[2])
        ctx.num_experts, ctx.bias_dtype = inputs[1].shape[0], inputs[1].dtype

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (expert,) = ctx.saved_tensors
        classes = torch.arange(ctx.num_experts, device=expert.device)
        one_hot = (classes.unsqueeze(1) == expert).to(grad.dtype)  # [E, M]
        return grad, (one_hot @ grad).to(ctx.bias_dtype), None


class SortedChoices(NamedTuple):
    """The N * k choices in expert order: the experts' input rows.

    ``order[r]`` is the choice (flat index into ``[N, k]``) at row r and ``row[c]`` the row of
    choice c (its inverse); ``expert[r]`` is row r's expert, E for a dropped choice, and
    expert e's rows end at ``offsets[e]`` (rows past ``offsets[-1]`` are dropped choices).
    ``kept`` is None where nothing can be dropped (dropless routing): no row needs a mask.
    """

    order: Tensor  # [N * k] long
    row: Tensor  # [N * k] long
    expert: Tensor  # [N * k] long, sorted
    offsets: Tensor  # [E] long, cumulative row counts
    kept: Tensor | None  # [N * k] bool, per choice; None: all

    @property
    def row_kept(self) -> Tensor | None:
        """[N * k] bool per row: it holds a kept choice (None: all do)."""
        return None if self.kept is None else self.expert < self.offsets.shape[0]

    def counts(self) -> Tensor:
        """Rows per expert ``[E]``."""
        return torch.diff(self.offsets, prepend=self.offsets.new_zeros(1))


def sort_by_expert(expert_index: Tensor, dropped: Tensor | None, num_experts: int) -> SortedChoices:
    """Group the choices ``[N, k]`` by expert, dropped ones last, in token order within an
    expert (stable sort), so results are deterministic. Sizes depend on N and k only.
    ``dropped`` None: nothing is dropped (dropless routing), and nothing needs masking."""
    kept = None if dropped is None else ~dropped.reshape(-1)
    key = expert_index.reshape(-1)
    if kept is not None:
        key = torch.where(kept, key, num_experts)
    expert, order = torch.sort(key, stable=True)
    ends = torch.arange(1, num_experts + 1, device=key.device, dtype=key.dtype)
    offsets = torch.searchsorted(expert, ends)
    row = torch.empty_like(order)
    row[order] = torch.arange(order.numel(), device=order.device)
    return SortedChoices(order, row, expert, offsets, kept)


def gather_tokens(x: Tensor, sorted_choices: SortedChoices, top_k: int) -> Tensor:
    """The experts' input rows ``[N * k, dim]``: row r holds the token of choice ``order[r]``
    (choice c belongs to token c // k). A token's k copies are a ``[N, k, dim]`` view, so its
    gradient is their sum, a reduction; the rows of dropped choices get no gradient."""
    s = sorted_choices
    if top_k > 1:
        x = x.unsqueeze(1).expand(-1, top_k, -1).reshape(-1, x.shape[-1])
    return MatchedGather.apply(x, s.order, None, s.row, s.kept)


def combine(expert_out: Tensor, sorted_choices: SortedChoices, gates: Tensor) -> Tensor:
    """``y_i = sum_j gate_ij * out(choice ij)`` over token i's kept choices, from the rows
    ``[N * k, dim]`` (0 for a token whose choices were all dropped).

    Accumulates in at least float32 (gates are float32, and summing top-k contributions in
    bf16 loses precision); the caller casts to the input dtype.
    """
    s = sorted_choices
    num_tokens, top_k = gates.shape
    chosen = MatchedGather.apply(expert_out, s.row, s.kept, s.order, s.row_kept)
    weighted = chosen.view(num_tokens, top_k, chosen.shape[-1]) * gates.unsqueeze(-1)
    return weighted[:, 0] if top_k == 1 else weighted.sum(dim=1)


class Slots(NamedTuple):
    """Where each sorted row sits in an ``[E, C]`` capacity buffer, and which row fills each
    slot (``valid`` False: an empty slot, read as zeros)."""

    of_row: Tensor  # [N * k] long, slot e * C + i of row r (0 for a dropped row)
    row: Tensor  # [E * C] long, the row in slot s
    valid: Tensor  # [E * C] bool


def slot_rows(sorted_choices: SortedChoices, capacity: int) -> Slots:
    """Expert e's i-th row goes to slot ``e * C + i``; a kept expert never has more than C."""
    s = sorted_choices
    num_experts, counts = s.offsets.shape[0], s.counts()
    starts = s.offsets - counts
    expert = s.expert.clamp(max=num_experts - 1)
    rows = torch.arange(s.expert.numel(), device=s.expert.device)
    of_row = expert * capacity + rows - starts[expert]
    if s.kept is not None:
        of_row = torch.where(s.row_kept, of_row, 0)
    slot = torch.arange(capacity, device=starts.device)
    row = starts.unsqueeze(1) + slot
    valid = slot < counts.unsqueeze(1)
    row = torch.where(valid, row, 0).reshape(-1)
    return Slots(of_row, row, valid.reshape(-1))


def fill_slots(rows: Tensor, slots: Slots, row_kept: Tensor | None) -> Tensor:
    """The ``[E * C, dim]`` buffer of the sorted ``rows`` (empty slots 0)."""
    return MatchedGather.apply(rows, slots.row, slots.valid, slots.of_row, row_kept)


def empty_slots(out: Tensor, slots: Slots, row_kept: Tensor | None) -> Tensor:
    """The sorted rows ``[N * k, dim]`` back from the buffer (dropped rows 0)."""
    return MatchedGather.apply(out, slots.of_row, row_kept, slots.row, slots.valid)
