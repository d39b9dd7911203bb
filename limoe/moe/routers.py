"""The routers, one class each behind ``Router``'s interface: top-k (LIMoE, V-MoE), expert
choice (Zhou et al., 2022), Soft MoE (``soft.SoftRouter``) and the modality router (the
multiway MLP of VLMo and BEiT-3). Each is made as ``Router(dim, num_experts, **options)``: the
config's ``model.moe.router`` node (``conf/router/``) names the class and its options. Nothing
outside this module switches on a router's name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .routing import (
    Router,
    RouterOutput,
    RouterScores,
    add_gating_noise,
    assign_slots,
    capacity_of_real,
    compute_capacity,
    expert_choice,
    one_hot,
    route,
)
from .soft import SoftRouter

# The weight of V-MoE's importance and load losses for top-k routing where none is given: 4x
# vmoe's 0.005, with which experts of the first blocks go unused when every block has experts
# (docs/results.md, "Experts that earn their keep"); recipe=vmoe and recipe=limoe keep 0.005.
TOPK_BALANCE_WEIGHT = 0.02


class TopKRouter(Router):
    """Tokens choose experts: a linear map to logits, softmax, the top-k, a capacity per expert
    and Batch Priority Routing deciding who is dropped when an expert is full.

    ``weight [E, dim]`` is initialised with std ``init_std`` (None: LeCun normal, dim**-0.5,
    as vmoe's router: logits spread from the start, so the entropy losses have a gradient at
    once). With ``noisy_gating`` the logits get V-MoE's Gaussian noise of std 1/E in training.
    """

    name = "topk"
    balance_weight = TOPK_BALANCE_WEIGHT
    shards = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        batch_priority: bool = True,
        renormalize_gates: bool = False,
        noisy_gating: bool = True,
        capacity_multiple: int = 4,
        init_std: float | None = None,
    ) -> None:
        super().__init__(num_experts)
        _check_int("top_k", top_k, 1, num_experts)
        _check_int("capacity_multiple", capacity_multiple, 1)
        self.top_k = top_k
        self.batch_priority = batch_priority
        self.renormalize_gates = renormalize_gates
        self.noisy_gating = noisy_gating
        self.capacity_multiple = capacity_multiple
        self.init_std = dim**-0.5 if init_std is None else float(init_std)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        # nn.Linear's Kaiming draw, overwritten at once: the router was an nn.Linear when the
        # documented runs were made, and drawing the same random numbers keeps every later
        # parameter, so seeded runs reproduce their figures.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.trunc_normal_(self.weight, std=self.init_std)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"batch_priority={self.batch_priority}, noisy_gating={self.noisy_gating}")  # fmt: skip

    def logits(self, x: Tensor) -> Tensor:
        """Router logits [N, E] in float32, outside autocast: routing is brittle in bf16."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())

    def noisy_logits(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        """``(logits, clean_logits, noise_std)``: the logits routed on (with V-MoE's noise in
        training, where ``noisy_gating``) and those before the noise. The losses see the
        routing actually used, as vmoe's; its importance and load losses read the clean ones."""
        clean = self.logits(x)
        if not (self.noisy_gating and self.training):
            return clean, clean, 0.0
        return add_gating_noise(clean, self.num_experts), clean, 1.0 / self.num_experts

    def capacity_of(self, num_tokens: int, capacity_factor: float | None) -> int | None:
        """Each expert's capacity for ``num_tokens`` (``compute_capacity``; None: dropless)."""
        return compute_capacity(
            num_tokens, self.num_experts, self.top_k, capacity_factor, self.capacity_multiple
        )

    def limit_of(self, valid: Tensor | None, capacity_factor: float | None) -> Tensor | None:
        """The capacity of the real tokens where padding is routed too (``capacity_of_real``),
        None where every token is real or the layer is dropless (the buffer's size is then
        the capacity)."""
        if valid is None or capacity_factor is None:
            return None
        return capacity_of_real(
            valid, self.num_experts, self.top_k, capacity_factor, self.capacity_multiple
        )

    def forward(
        self, x: Tensor, modality: Tensor | None, sequence: Tensor | None,
        capacity_factor: float | None, valid: Tensor | None = None,
    ) -> RouterOutput:  # fmt: skip
        logits, clean, noise_std = self.noisy_logits(x)
        capacity = self.capacity_of(x.shape[0], capacity_factor)
        probs, gates, expert_index = route(logits, self.top_k, self.renormalize_gates)
        slot = limit = None
        if capacity is None:
            # Dropless: nothing is dropped and the sorted dispatch needs no slot positions,
            # so skip assign_slots' sorts and scatters (a tenth of a small layer's time).
            dropped = torch.zeros_like(gates, dtype=torch.bool)
        else:
            # BPR priority: the raw top-1 router probability (with renormalised k=1 gates
            # every gate is 1, so the raw probability is the only informative score).
            priority = probs.amax(dim=-1) if self.batch_priority else None
            limit = self.limit_of(valid, capacity_factor)
            slot, dropped = assign_slots(
                expert_index, self.num_experts, capacity if limit is None else limit, priority,
                valid,
            )  # fmt: skip
        return RouterOutput(
            expert_index=expert_index, gates=gates, dropped=dropped, probs=probs,
            capacity=capacity, limit=limit, slot=slot,
            scores=RouterScores(logits, probs, clean, expert_index, noise_std),
        )  # fmt: skip


class ExpertChoiceRouter(TopKRouter):
    """Experts choose tokens: each expert takes its C most probable tokens (``expert_choice``),
    so loads are balanced by construction (no balancing loss by default) and a token is served
    by 0 to E experts. Needs a capacity factor; ``top_k`` only sizes the capacity."""

    name = "expert_choice"
    balance_weight = 0.0
    capacity = "required"
    experts_choose = True

    def forward(
        self, x: Tensor, modality: Tensor | None, sequence: Tensor | None,
        capacity_factor: float | None, valid: Tensor | None = None,
    ) -> RouterOutput:  # fmt: skip
        logits, clean, noise_std = self.noisy_logits(x)
        capacity = self.capacity_of(x.shape[0], capacity_factor)
        probs = torch.softmax(logits, dim=-1)
        limit = self.limit_of(valid, capacity_factor)
        expert_index, gates, slot, dropped = expert_choice(probs, capacity, valid, limit)
        return RouterOutput(
            expert_index=expert_index, gates=gates, dropped=dropped, probs=probs,
            capacity=capacity, limit=limit, slot=slot,
            scores=RouterScores(logits, probs, clean, expert_index, noise_std),
        )  # fmt: skip


class ModalityRouter(Router):
    """No learned routing: a token of modality m goes to expert m with gate 1 (the multiway
    MLPs of VLMo and BEiT-3). Dropless, and nothing to regularise: no auxiliary losses."""

    name = "modality"
    capacity = "none"

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__(num_experts)  # ``dim``: every router is made alike; this one reads none

    def check(self, capacity_factor: float | None, modality_names: Sequence[str]) -> None:
        super().check(capacity_factor, modality_names)
        if self.num_experts != len(modality_names):
            raise ValueError(
                f"router=modality sends each token to its modality's expert: num_experts "
                f"must be {len(modality_names)} (one per modality {tuple(modality_names)}), "
                f"got {self.num_experts}"
            )

    def forward(
        self, x: Tensor, modality: Tensor | None, sequence: Tensor | None,
        capacity_factor: float | None, valid: Tensor | None = None,
    ) -> RouterOutput:  # fmt: skip
        if modality is None:
            raise ValueError("router='modality' needs each token's modality id")
        expert_index = modality.long().unsqueeze(1)
        return RouterOutput(
            expert_index=expert_index,
            gates=torch.ones(expert_index.shape, dtype=torch.float32, device=x.device),
            dropped=torch.zeros_like(expert_index, dtype=torch.bool),
            probs=one_hot(modality.long(), self.num_experts),
        )


ROUTERS: dict[str, type[Router]] = {
    cls.name: cls for cls in (TopKRouter, ExpertChoiceRouter, SoftRouter, ModalityRouter)
}


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """One line naming the router option, for a value that is not an integer in range."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"model.moe.router.{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f"in [{low}, num_experts={high}]" if high is not None else f">= {low}"
        raise ValueError(f"model.moe.router.{name} must be {span}, got {value}")
