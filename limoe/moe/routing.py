"""Routing: router logits -> top-k choices -> expert slots (capacity, Batch Priority Routing).

Everything here works on flat token sets ``[N, ...]`` and never builds dense
``[N, E, C]`` one-hot tensors: slot positions come from a stable sort by expert,
as in MegaBlocks, so memory is O(N * k) whatever the number of experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

# The modalities LIMoE routes together, in the order of their ids (image 0, text 1).
MODALITY_NAMES: tuple[str, ...] = ("image", "text")


class TokenOrigin(NamedTuple):
    """Where each routed token came from, in the order the layer sees them."""

    modality: Tensor  # [N] long: ids into the layer's modality names (image 0, text 1)
    sequence: Tensor  # [N] long: the sequence in the batch (an image's or a caption's pair)
    position: Tensor  # [N] long: patch index (image) or token position (text) in it
    valid: Tensor | None = None  # [N] bool: a real token, not text padding (None: all real)


class RouterScores(NamedTuple):
    """What the auxiliary losses read of one routing: ``logits`` and ``probs`` [N, E] as routed
    (noisy while training), ``clean_logits`` before the noise, the k choices ``expert_index``
    [N, k] and the noise's std (0 without noise). A router without per-expert logits (Soft
    MoE's probabilities are shares of each token's output) gives None for both logits: its
    importance loss reads ``probs``, and the z-loss and V-MoE load loss, defined on logits,
    are 0."""

    logits: Tensor | None
    probs: Tensor
    clean_logits: Tensor | None
    expert_index: Tensor
    noise_std: float = 0.0


class RouterOutput(NamedTuple):
    """What a router decided for one call: the working state the layer runs the experts on.
    ``gates`` are the combine weights (raw softmax probabilities of the chosen experts, or
    those renormalised over the top-k); a dropped choice keeps its gate but adds nothing."""

    expert_index: Tensor  # [N, k] long, choice 0 = top-1
    gates: Tensor  # [N, k] float32
    dropped: Tensor  # [N, k] bool: past its expert's capacity (or not picked by it)
    probs: Tensor  # [N, E] float32 router softmax (after noise when noisy gating was on)
    capacity: int | None = None  # per-expert capacity (the buffer's size); None: dropless
    # 0-d tensor: the capacity of the real tokens where padding is routed too (the drop
    # threshold; ``capacity`` then sizes the buffer). None: ``capacity`` is the threshold.
    limit: Tensor | None = None
    slot: Tensor | None = None  # [N, k] each choice's slot in its expert's buffer (None: dropless)
    scores: RouterScores | None = None  # what the auxiliary losses read; None: no losses
    mixing: object | None = None  # Soft MoE's dispatch and combine weights (``soft``)


@dataclass
class Routing:
    """The record of one MoE layer call, for the trainer (``aux_loss``), the logs and the
    analyses: what each token chose, where it came from (``sequence``, ``position``: see
    ``TokenOrigin``, so an analysis reads a token's pair and patch off the record instead of
    re-deriving the tower's token order) and the raw auxiliary losses. ``MoELayer`` makes it
    once per call from the router's ``RouterOutput``."""

    expert_index: Tensor  # [N, k] long, choice 0 = top-1
    gates: Tensor  # [N, k] float32
    dropped: Tensor  # [N, k] bool, True where the choice exceeded its expert's capacity
    probs: Tensor  # [N, E] float32 router softmax (after noise when noisy gating was on)
    modality: Tensor | None = None  # [N] long, or None
    capacity: int | None = None  # per-expert capacity (the buffer's size); None = dropless
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # raw: "<loss>/<modality>"
    aux_loss: Tensor | None = None  # scalar: weighted sum of aux_losses (the trainer adds it)
    router: str = "topk"  # the router's name (``Router.name``), a label for records
    # True where experts choose tokens (expert choice): a token's E choices are requests only,
    # and a token no expert picked is dropped; False where tokens choose experts.
    experts_choose: bool = False
    sequence: Tensor | None = None  # [N] long, see TokenOrigin
    position: Tensor | None = None  # [N] long, see TokenOrigin
    # [N] bool: the real tokens; the others (text padding, routed to keep shapes fixed) are
    # dropped and left out of losses and statistics. None: every token is real.
    valid: Tensor | None = None
    limit: Tensor | None = None  # see RouterOutput

    def record(self, device: torch.device | str = "cpu", sequence_offset: int = 0) -> Routing:
        """A detached copy to keep (on ``device``) of the real tokens only (``real``); the
        sequence ids shifted by ``sequence_offset`` (records of several batches)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(device)

        routing = self.real()
        sequence = None if routing.sequence is None else routing.sequence + sequence_offset
        return replace(
            routing,
            expert_index=move(routing.expert_index),
            gates=move(routing.gates.float()),
            dropped=move(routing.dropped),
            probs=move(routing.probs.float()),
            modality=move(routing.modality),
            aux_losses={k: move(v) for k, v in routing.aux_losses.items()},
            aux_loss=move(routing.aux_loss),
            sequence=move(sequence),
            position=move(routing.position),
        )

    def real(self) -> Routing:
        """The record of the real tokens only (``valid``), for analysis: its sizes depend on
        the data, so the host reads the mask (a synchronisation, outside training steps)."""
        if self.valid is None:
            return self
        keep = self.valid.nonzero().squeeze(1)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, keep.to(t.device))

        return replace(
            self, expert_index=pick(self.expert_index), gates=pick(self.gates),
            dropped=pick(self.dropped), probs=pick(self.probs), modality=pick(self.modality),
            sequence=pick(self.sequence), position=pick(self.position),
            capacity=self.capacity if self.limit is None else int(self.limit), limit=None,
            valid=None,
        )  # fmt: skip


def one_hot(index: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``F.one_hot(index, num_classes)`` in ``dtype`` by comparison: indices out of range give a
    zero row, and no value is checked on the host (``F.one_hot`` reads min and max there)."""
    classes = torch.arange(num_classes, device=index.device)
    return (index.unsqueeze(-1) == classes).to(dtype)


class Router(nn.Module):
    """What every router is: made as ``Router(dim, num_experts, **options)`` (the config's
    ``model.moe.router`` node), called as ``router(x [N, dim], modality, sequence,
    capacity_factor, valid)`` it returns the ``RouterOutput`` of the N tokens (``valid``: the
    real ones, None: all): choices, gates, drops, and the scores the auxiliary losses read.
    ``MoELayer`` runs the experts on it and adds the losses.

    Class attributes say what a layer needs to know about a router, so no code outside this
    module asks for a router by name: ``balance_weight`` is the classic balancing losses'
    weight where none is given; ``capacity`` is ``"optional"`` (a factor, or dropless),
    ``"required"`` (expert choice), ``"none"`` (dropless only) or ``"ignored"`` (Soft MoE
    has no drops); ``shards`` says whether expert parallelism can serve it; ``mixes`` that its
    experts run on weighted slots (Soft MoE), not on chosen tokens; ``experts_choose`` that
    experts pick tokens (a token's choices are requests, see ``Routing``).
    """

    name: ClassVar[str] = ""
    balance_weight: ClassVar[float] = 0.0
    capacity: ClassVar[str] = "optional"
    shards: ClassVar[bool] = False
    mixes: ClassVar[bool] = False
    experts_choose: ClassVar[bool] = False
    top_k: int = 1  # experts per token (a top-k router's own; it sizes expert choice's capacity)

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"model.moe.num_experts must be an integer >= 1, got {num_experts!r}")
        self.num_experts = num_experts

    def check(self, capacity_factor: float | None, modality_names: Sequence[str]) -> None:
        """Raise a one-line ValueError where the layer's options do not fit this router."""
        if self.capacity == "required" and capacity_factor is None:
            raise ValueError(
                f"router={self.name} needs a capacity_factor (each expert takes "
                "capacity_factor * top_k * N / E tokens); null (dropless) has no meaning there"
            )
        if self.capacity == "none" and capacity_factor is not None:
            raise ValueError(f"router={self.name!r} is dropless: capacity_factor must be None, "
                             f"got {capacity_factor}")  # fmt: skip

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


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


def capacity_of_real(
    valid: Tensor, num_experts: int, top_k: int, capacity_factor: float, multiple_of: int
) -> Tensor:
    """``compute_capacity`` of the real tokens (``valid.sum()``), as a 0-d tensor on their
    device: the drop threshold where padding is routed too, with no host read. It never
    exceeds ``compute_capacity(len(valid))``, the buffer's size."""
    raw = valid.sum(dtype=torch.float64) * (top_k * capacity_factor / num_experts)
    capacity = torch.ceil(torch.round(raw * 1e9) / 1e9).long()
    return capacity + torch.remainder(-capacity, multiple_of)


def add_gating_noise(logits: Tensor, num_experts: int) -> Tensor:
    """V-MoE noisy gating: Gaussian noise of std 1/E on the router logits (training only)."""
    return logits + torch.randn_like(logits) / num_experts


def route(
    logits: Tensor,
    top_k: int,
    renormalize: bool = False,
    score: str = "softmax",
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Router logits [N, E] -> (probs [N, E], gates [N, k], expert_index [N, k]), in float32.

    ``score`` turns logits into affinities: ``softmax`` over the experts (V-MoE order,
    softmax then top-k, so gates are probabilities over all E experts), or ``sigmoid`` of each
    logit on its own (DeepSeek-V3, MoE-ViE), whose ``probs`` are the affinities normalised
    to sum to 1 (what the auxiliary losses read). ``bias`` ([N, E] or [1, E]: auxiliary-loss-
    free balancing) is added to the affinities only to choose the top-k: the gates are the
    chosen experts' unbiased affinities, so the bias has no gradient and no part in the output
    beyond the choice. With ``renormalize`` the k gates of each token are rescaled to sum to
    1, as in Mixtral/ST-MoE top-2. Renormalisation ignores drops: a token whose second choice
    is dropped still weighs its first choice by its renormalised gate.

    A renormalised top-1 gate is p / p = 1 whatever the router says, which would leave the
    router no gradient from the task loss. It is computed as p / stop_gradient(p) instead:
    its value is exactly 1, and the router gets the gradient of the plain gate p scaled by
    1 / p, bounded at any sharpness (Switch's straight-through view of the gate).
    """
    if score == "sigmoid":
        affinity = torch.sigmoid(logits.float())
        probs = affinity / affinity.sum(dim=-1, keepdim=True)
    else:
        affinity = probs = torch.softmax(logits.float(), dim=-1)
    if bias is None:
        gates, expert_index = top_choices(affinity, top_k)
    else:
        expert_index = top_choices(affinity + bias, top_k)[1]
        gates = affinity.gather(1, expert_index)
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
    capacity: int | Tensor | None,
    priority: Tensor | None = None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Slot position of every choice in its expert's buffer, and whether it was dropped.

    Choices are served rank by rank (all top-1 choices before any top-2 choice, as
    in V-MoE), and within a rank in ``service_order(priority)``. A choice's position
    is the number of choices served before it that go to the same expert; it is
    dropped when position >= capacity (never when ``capacity`` is None; a 0-d tensor
    ``capacity`` is compared on the device). Tokens not ``valid`` take no position and are
    dropped. Returns ``(position [N, k] long, dropped [N, k] bool)``. The per-expert starts
    come from ``searchsorted`` over the sorted choices: no count is read on the host.
    """
    num_tokens, top_k = expert_index.shape
    order = service_order(priority, num_tokens, expert_index.device)
    key = (
        expert_index
        if valid is None
        else torch.where(valid.unsqueeze(1), expert_index, num_experts)
    )
    # Flatten in service order: rank-major, then tokens in priority order.
    served = key[order].t().reshape(-1)
    # Position within an expert = rank of the choice among that expert's choices.
    by_expert = torch.sort(served, stable=True)
    starts = torch.searchsorted(by_expert.values, by_expert.values, side="left")
    ranks = torch.arange(served.numel(), device=served.device) - starts
    served_position = torch.empty_like(served)
    served_position[by_expert.indices] = ranks
    position = torch.empty_like(expert_index)
    position[order] = served_position.view(top_k, num_tokens).t()
    dropped = torch.zeros_like(expert_index, dtype=torch.bool)
    if capacity is not None:
        dropped = position >= capacity
    if valid is not None:
        dropped = dropped | ~valid.unsqueeze(1)
    return position, dropped


def expert_choice(
    probs: Tensor, capacity: int, valid: Tensor | None = None, limit: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Expert-choice routing (Zhou et al., 2022): each expert takes its ``capacity`` tokens of
    highest router probability, so loads are balanced by construction and a token is served
    by 0 to E experts.

    Returned in the shape of top-k routing with k = E, so the rest of the layer (dispatch,
    statistics) needs no special case: token i's choices are all E experts in order of its
    own probability, ``gates`` their probabilities, ``position`` the slot an expert gave it
    and ``dropped`` where that expert did not pick it. Tokens not ``valid`` are picked last
    and dropped; ``limit`` (a 0-d tensor, the capacity of the real tokens) drops the picks
    past it. Returns ``(expert_index [N, E], gates [N, E], position [N, E], dropped [N, E])``.
    """
    num_tokens, num_experts = probs.shape
    gates, expert_index = torch.sort(probs, dim=-1, descending=True, stable=True)
    picks = min(capacity, num_tokens)
    # Expert e's picks: tokens by descending probs[:, e] (ties to the lower index).
    claim = probs if valid is None else torch.where(valid.unsqueeze(1), probs, -1.0)
    picked = torch.sort(claim.t(), dim=-1, descending=True, stable=True).indices[:, :picks]
    slot = torch.full((num_tokens, num_experts), capacity, dtype=torch.long, device=probs.device)
    slot_ids = torch.arange(picks, device=probs.device).expand(num_experts, picks)
    expert_ids = torch.arange(num_experts, device=probs.device)[:, None].expand(-1, picks)
    slot[picked, expert_ids] = slot_ids  # slot[token, expert]
    position = slot.gather(1, expert_index)
    dropped = position >= (capacity if limit is None else limit)
    if valid is not None:
        dropped = dropped | ~valid.unsqueeze(1)
    return expert_index, gates, position, dropped
