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
    MODALITY_NAMES,
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
# How a top-k router turns logits into affinities, and how its loads are balanced.
SCORES = ("softmax", "sigmoid")
BALANCES = ("aux", "bias")


class TopKRouter(Router):
    """Tokens choose experts: a linear map to logits, softmax, the top-k, a capacity per expert
    and Batch Priority Routing deciding who is dropped when an expert is full.

    ``weight [E, dim]`` is initialised with std ``init_std`` (None: LeCun normal, dim**-0.5,
    as vmoe's router: logits spread from the start, so the entropy losses have a gradient at
    once). With ``noisy_gating`` the logits get V-MoE's Gaussian noise of std 1/E in training.

    ``score``: ``softmax`` affinities (LIMoE, V-MoE) or ``sigmoid`` ones (DeepSeek-V3, MoE-ViE;
    ``route``); ``renormalize_gates`` None renormalises the gates over the top-k for sigmoid
    scores only. ``balance``: ``aux`` balances loads by the auxiliary losses; ``bias`` by
    DeepSeek-V3's auxiliary-loss-free rule: a bias per expert (``expert_bias``, a persistent
    buffer; one row per modality with ``bias_per_modality``) is added to the affinities to
    choose the top-k, never to the gates; training calls count each expert's tokens
    (``expert_tokens``), and ``update_expert_bias`` moves the bias by ``bias_step`` towards
    balance once per optimiser step. The balancing losses then default to 0.
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
        renormalize_gates: bool | None = None,
        noisy_gating: bool = True,
        capacity_multiple: int = 4,
        init_std: float | None = None,
        score: str = "softmax",
        balance: str = "aux",
        bias_step: float = 1e-3,
        bias_per_modality: bool = False,
    ) -> None:
        super().__init__(num_experts)
        _check_int("top_k", top_k, 1, num_experts)
        _check_int("capacity_multiple", capacity_multiple, 1)
        self.score = _check_choice("score", score, SCORES)
        self.balance = _check_choice("balance", balance, BALANCES)
        if self.experts_choose and (score, balance) != ("softmax", "aux"):
            raise ValueError(f"router={self.name} balances by construction on softmax scores: "
                             f"it takes score=softmax and balance=aux, got score={score!r}, "
                             f"balance={balance!r}")  # fmt: skip
        self.top_k = top_k
        self.batch_priority = batch_priority
        self.renormalize_gates = (
            score == "sigmoid" if renormalize_gates is None else renormalize_gates
        )
        self.noisy_gating = noisy_gating
        self.capacity_multiple = capacity_multiple
        self.init_std = dim**-0.5 if init_std is None else float(init_std)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        # nn.Linear's Kaiming draw, overwritten at once: the router was an nn.Linear when the
        # documented runs were made, and drawing the same random numbers keeps every later
        # parameter, so seeded runs reproduce their figures.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.trunc_normal_(self.weight, std=self.init_std)
        if balance == "bias":
            self.init_bias(bias_step, bias_per_modality)

    def init_bias(self, bias_step: float, per_modality: bool) -> None:
        """The buffers of auxiliary-loss-free balancing: ``expert_bias [M, E]`` and the tokens
        each expert was chosen by since the last update, ``expert_tokens [M, E]`` (float32:
        exact to 2**24 tokens an expert per optimiser step, and all-reduced as it is), with M
        the modalities (``MODALITY_NAMES``) or 1. Both persist, so a resumed run continues
        with the same bias. The balancing losses' default weight is 0 here."""
        if isinstance(bias_step, bool) or not isinstance(bias_step, int | float) or bias_step < 0:
            raise ValueError(f"model.moe.router.bias_step must be a number >= 0, got {bias_step!r}")
        self.bias_step = float(bias_step)
        self.balance_weight = 0.0
        rows = len(MODALITY_NAMES) if per_modality else 1
        self.register_buffer("expert_bias", torch.zeros(rows, self.num_experts))
        self.register_buffer("expert_tokens", torch.zeros(rows, self.num_experts))

    def check(self, capacity_factor: float | None, modality_names: Sequence[str]) -> None:
        super().check(capacity_factor, modality_names)
        rows = len(getattr(self, "expert_bias", ()))
        if rows > 1 and rows != len(modality_names):  # one bias row per modality
            raise ValueError(
                f"model.moe.router.bias_per_modality keeps one bias per modality of "
                f"{MODALITY_NAMES}, but the layer routes {tuple(modality_names)}"
            )

    def extra_repr(self) -> str:
        extra = "" if self.balance == "aux" else f", balance=bias, bias_step={self.bias_step}"
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, score={self.score}, "
                f"batch_priority={self.batch_priority}, noisy_gating={self.noisy_gating}"
                f"{extra}")  # fmt: skip

    def bias_of(self, modality: Tensor | None) -> Tensor | None:
        """The bias each token's choice adds ([N, E], or [1, E] when one row serves all);
        None without bias balancing."""
        if self.balance != "bias":
            return None
        if self.expert_bias.shape[0] == 1 or modality is None:
            return self.expert_bias[:1]
        return self.expert_bias.index_select(0, modality)

    @torch.no_grad()
    def count_tokens(self, expert_index: Tensor, modality: Tensor | None,
                     valid: Tensor | None) -> None:  # fmt: skip
        """Add this call's choices of the real tokens to ``expert_tokens`` (per modality
        where the bias is): one-hot sums and a matmul, no scatter, so no atomics and the same
        counts every run."""
        chosen = one_hot(expert_index, self.num_experts).sum(dim=1)  # [N, E]
        if valid is not None:
            chosen = chosen * valid.unsqueeze(1)
        rows = self.expert_tokens.shape[0]
        if rows == 1 or modality is None:  # no modality ids: the first row's bias was taken
            self.expert_tokens[0].add_(chosen.sum(dim=0))
        else:
            self.expert_tokens.add_(one_hot(modality, rows).t() @ chosen)

    @torch.no_grad()
    def update_bias(self, counts: Tensor | None = None) -> None:
        """One step of DeepSeek-V3's rule, as torchtitan's: each expert's bias moves by
        ``bias_step`` up where it got fewer tokens than the mean of its row, down where it got
        more (``sign``), centred so each row's bias keeps mean 0; then the counts restart.
        ``counts`` (default ``expert_tokens``): the counts summed over every process."""
        counts = self.expert_tokens if counts is None else counts
        delta = self.bias_step * torch.sign(counts.mean(dim=-1, keepdim=True) - counts)
        self.expert_bias.add_(delta - delta.mean(dim=-1, keepdim=True))
        self.expert_tokens.zero_()

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
        bias = self.bias_of(modality)
        probs, gates, expert_index = route(
            logits, self.top_k, self.renormalize_gates, self.score, bias
        )
        if bias is not None and self.training:
            self.count_tokens(expert_index, modality, valid)
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


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"model.moe.router.{name} must be one of {', '.join(choices)}, "
                         f"got {value!r}")  # fmt: skip
    return value


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """One line naming the router option, for a value that is not an integer in range."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"model.moe.router.{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f"in [{low}, num_experts={high}]" if high is not None else f">= {low}"
        raise ValueError(f"model.moe.router.{name} must be {span}, got {value}")
