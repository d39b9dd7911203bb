"""MoELayer: the sparse MLP of LIMoE / V-MoE (router + capacity + BPR + experts + aux losses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import combine, gather_tokens, sort_by_expert
from .experts import Experts
from .losses import LOSS_NAMES, LOSS_SCOPES, compute_aux_losses, weighted_sum
from .parallel import parallel_dispatch, shard_experts
from .reference import onehot_moe
from .routing import (
    MODALITY_NAMES,
    Routing,
    add_gating_noise,
    assign_slots,
    compute_capacity,
    expert_choice,
    route,
)
from .soft import SoftRouter, soft_moe


class Choices(NamedTuple):
    """What the router chose for the N tokens of one call (``MoELayer.route_tokens``)."""

    probs: Tensor  # [N, E] router probabilities
    gates: Tensor  # [N, k] combine weights of the chosen experts
    expert_index: Tensor  # [N, k] the chosen experts, choice 0 = top-1
    position: Tensor | None  # [N, k] slot in the expert's buffer; None when none is needed
    dropped: Tensor  # [N, k] bool: over the expert's capacity
    capacity: int | None  # per expert; None = dropless


class MoELayer(nn.Module):
    """Sparse Mixture-of-Experts MLP over a flat token set ``x [N, dim]``.

    Each token goes to its ``top_k`` experts; an expert serves at most C tokens
    (``compute_capacity``), Batch Priority Routing decides who is dropped when it
    is full, and a dropped choice contributes 0 (the block's residual carries the
    token). ``forward`` returns ``(y [N, dim], Routing)``; ``routing.aux_loss`` is
    the weighted auxiliary loss for the trainer to add.

    ``modality [N]`` (ids into ``modality_names``) only affects the aux losses: LIMoE's
    entropy losses are per modality, the classic ones over all tokens (``loss_scope="all"``,
    as V-MoE and LIMoE) or per modality; routing, capacity and BPR are shared by all tokens
    so modalities compete for the same experts.

    ``dispatch="sorted"`` (default) permutes kept choices into per-expert slices
    (MegaBlocks/ScatterMoE); ``"onehot"`` is GShard's dense one-hot einsum dispatch, kept
    as the reference for tests and benchmarks: same routing, same result, more memory.
    ``gemm`` is how the sorted path runs the experts' GEMMs (``Experts``: ``auto`` takes
    PyTorch's grouped GEMM on a CUDA GPU in bf16, a loop of ``addmm`` elsewhere).

    ``router`` picks who chooses: ``topk`` (tokens choose experts, as LIMoE), ``expert_choice``
    (each expert takes its C most confident tokens, Zhou et al. 2022; needs a
    ``capacity_factor``; its routing record has k = E choices per token, ``dropped`` where an
    expert did not pick it) or ``soft`` (Soft MoE, Puigcerver et al. 2023: ``slots_per_expert``
    slots per expert and per ``group`` of tokens, each a weighted average of the group; the
    record's single choice is the expert that wrote most of the token's output) or
    ``modality`` (no learned routing: token of modality m goes to expert m with gate 1, as the
    multiway MLPs of VLMo and BEiT-3; ``num_experts`` equals the number of modalities, it is
    dropless and has no auxiliary losses).

    ``eval_capacity_factor`` is the capacity factor in ``eval()`` mode, as V-MoE's: None keeps
    the training one, a number replaces it, ``"dropless"`` serves every choice.

    ``expert_parallel=True`` lets ``shard`` spread the experts over the processes of
    a ``torch.distributed`` group once it exists (``parallel``: tokens travel by all-to-all);
    until then, and on one process, the layer holds every expert.

    The defaults are those of ``conf/model/limoe.yaml``'s ``moe`` node, LIMoE's recipe
    (dropless top-1 with gating noise and a LeCun-normal router; V-MoE's importance and load
    losses at 0.02 over all tokens, 0 for the expert-choice and soft routers; both entropy
    losses at 0.01, S = 2 per modality), so
    ``MoELayer(dim, hidden, E)`` is the layer the default LIMoE builds; a test keeps the two
    equal.
    """

    DISPATCH_MODES = ("sorted", "onehot")
    ROUTERS = ("topk", "expert_choice", "soft", "modality")

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 16,
        top_k: int = 1,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | str | None = None,
        batch_priority: bool = True,
        renormalize_gates: bool = False,
        noisy_gating: bool = True,
        capacity_multiple: int = 4,
        importance_weight: float | None = None,
        load_weight: float | None = None,
        vmoe_load_weight: float | None = None,
        z_loss_weight: float = 0.0,
        local_entropy_weight: float = 0.01,
        global_entropy_weight: float = 0.01,
        global_entropy_min_experts: float | Sequence[float] = (2.0, 2.0),
        loss_scope: str = "all",
        modality_names: Sequence[str] = MODALITY_NAMES,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        dispatch: str = "sorted",
        gemm: str = "auto",
        router: str = "topk",
        slots_per_expert: int = 1,
        expert_parallel: bool = False,
        router_init_std: float | None = None,
    ) -> None:
        super().__init__()
        _check_config(num_experts, top_k, capacity_factor, capacity_multiple)
        if dispatch not in self.DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {self.DISPATCH_MODES}, got {dispatch!r}")
        _check_router(router, capacity_factor, slots_per_expert, self.ROUTERS)
        _check_modality_router(router, num_experts, top_k, capacity_factor, modality_names)
        self.eval_capacity_factor = _check_eval_capacity(eval_capacity_factor, router)
        if expert_parallel and (router in ("soft", "modality") or dispatch != "sorted"):
            raise ValueError(
                "expert_parallel needs dispatch='sorted' and router 'topk' or 'expert_choice', "
                f"got dispatch={dispatch!r}, router={router!r}"
            )
        self.expert_parallel = expert_parallel
        self.dispatch_mode = dispatch
        self.router_type = router
        self.slots_per_expert = slots_per_expert
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.batch_priority = batch_priority
        self.renormalize_gates = renormalize_gates
        self.noisy_gating = noisy_gating
        self.capacity_multiple = capacity_multiple
        self.modality_names = tuple(modality_names)
        self.min_experts = _min_experts_per_modality(
            global_entropy_min_experts, self.modality_names
        )
        _check_global_entropy(global_entropy_weight, self.min_experts, num_experts)
        if loss_scope not in LOSS_SCOPES:
            raise ValueError(f"loss_scope must be one of {LOSS_SCOPES}, got {loss_scope!r}")
        self.loss_scope = loss_scope
        unset = default_loss_weights(router)
        given = (importance_weight, load_weight, vmoe_load_weight)
        weights = tuple(unset[n] if w is None else w for n, w in zip(LOSS_NAMES, given))
        weights += (z_loss_weight, local_entropy_weight, global_entropy_weight)
        self.loss_weights = dict(zip(LOSS_NAMES, weights))
        # The router's initial weights: timm's 0.02, or LeCun normal (dim**-0.5, None) as
        # vmoe's router, whose logits then start about as spread as the hidden state is wide,
        # so the entropy losses (flat at uniform routing) have a gradient from the first step.
        self.router_init_std = dim**-0.5 if router_init_std is None else float(router_init_std)
        if router == "soft":
            self.router = SoftRouter(dim, num_experts * slots_per_expert)
        elif router == "modality":
            self.router = None  # nothing to learn: the modality id is the expert
        else:
            self.router = nn.Linear(dim, num_experts, bias=False)
            nn.init.trunc_normal_(self.router.weight, std=self.router_init_std)
        self.experts = Experts(
            num_experts, dim, hidden_dim, act_layer=act_layer, drop=drop, gemm=gemm
        )

    def extra_repr(self) -> str:
        return (
            f"router={self.router_type}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, batch_priority={self.batch_priority}"
        )

    @property
    def active_capacity_factor(self) -> float | None:
        """The capacity factor of this call: the training one, or in ``eval()`` mode
        ``eval_capacity_factor`` where set (``"dropless"``: None)."""
        if self.training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return None if self.eval_capacity_factor == "dropless" else self.eval_capacity_factor

    def forward(
        self, x: Tensor, modality: Tensor | None = None, group: Tensor | None = None
    ) -> tuple[Tensor, Routing]:
        """Route, dispatch, run experts, combine; returns ``(y [N, dim] in x.dtype, routing)``.

        ``group [N]`` (ids of the sequence each token belongs to) matters to Soft MoE only,
        which averages within a group; None: all tokens are one group."""
        self._check_inputs(x, modality, group)
        if self.router_type == "modality":
            return self.modality_forward(x, modality)
        clean_logits = logits = self.router_logits(x)
        noise_std = 0.0
        if self.router_type == "soft":
            y, choices, logits = self.soft_forward(x, logits, group)
            clean_logits = logits
        else:
            if self.noisy_gating and self.training:
                noise_std = 1.0 / self.num_experts
                logits = add_gating_noise(logits, self.num_experts)
            choices = self.route_tokens(logits)
            y = self.run_experts(x, choices)
        # Aux losses see the routing actually used (noisy logits in training), as in vmoe;
        # the importance and V-MoE load losses also read the clean logits.
        aux_losses = compute_aux_losses(
            logits, choices.probs, choices.expert_index, modality, self.modality_names,
            self.min_experts, clean_logits, noise_std, self.loss_scope,
        )  # fmt: skip
        routing = Routing(
            expert_index=choices.expert_index,
            gates=choices.gates,
            dropped=choices.dropped,
            probs=choices.probs,
            modality=None if modality is None else modality.long(),
            capacity=choices.capacity,
            aux_losses=aux_losses,
            aux_loss=weighted_sum(aux_losses, self.loss_weights),
            router=self.router_type,
        )
        return y.to(x.dtype), routing

    def modality_forward(self, x: Tensor, modality: Tensor | None) -> tuple[Tensor, Routing]:
        """The multiway MLP: each token to its modality's expert with gate 1; nothing is
        learned about routing, so there is no auxiliary loss."""
        if modality is None:
            raise ValueError("router='modality' needs each token's modality id")
        expert_index = modality.long().unsqueeze(1)
        gates = torch.ones(expert_index.shape, dtype=torch.float32, device=x.device)
        probs = F.one_hot(modality.long(), self.num_experts).float()
        dropped = torch.zeros_like(expert_index, dtype=torch.bool)
        position = None
        if self.dispatch_mode == "onehot":
            position, dropped = assign_slots(expert_index, self.num_experts, None)
        choices = Choices(probs, gates, expert_index, position, dropped, None)
        y = self.run_experts(x, choices)
        routing = Routing(
            expert_index=expert_index, gates=gates, dropped=dropped, probs=probs,
            modality=modality.long(), capacity=None, aux_losses={},
            aux_loss=x.new_zeros((), dtype=torch.float32), router="modality",
        )  # fmt: skip
        return y.to(x.dtype), routing

    def router_logits(self, x: Tensor) -> Tensor:
        """Router logits [N, E] (Soft MoE: slot logits [N, E * slots]) in float32, outside
        autocast: routing decisions are brittle in bf16."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.router_type == "soft":
                return self.router(x)
            return F.linear(x.float(), self.router.weight.float())

    def route_tokens(self, logits: Tensor) -> Choices:
        """Top-k or expert-choice routing of logits ``[N, E]``."""
        num_tokens = logits.shape[0]
        capacity = compute_capacity(
            num_tokens, self.num_experts, self.top_k, self.active_capacity_factor,
            self.capacity_multiple,
        )  # fmt: skip
        if self.router_type == "expert_choice":
            probs = torch.softmax(logits.float(), dim=-1)
            expert_index, gates, position, dropped = expert_choice(probs, capacity)
            return Choices(probs, gates, expert_index, position, dropped, capacity)
        probs, gates, expert_index = route(logits, self.top_k, self.renormalize_gates)
        if capacity is None and self.dispatch_mode == "sorted":
            # Dropless: nothing is dropped and the sorted dispatch needs no slot positions,
            # so skip assign_slots' sorts and scatters (a tenth of a small layer's time).
            dropped = torch.zeros_like(gates, dtype=torch.bool)
            return Choices(probs, gates, expert_index, None, dropped, None)
        # BPR priority: the raw top-1 router probability (with renormalised k=1 gates
        # every gate is 1, so the raw probability is the only informative score).
        priority = probs.amax(dim=-1) if self.batch_priority else None
        position, dropped = assign_slots(expert_index, self.num_experts, capacity, priority)
        return Choices(probs, gates, expert_index, position, dropped, capacity)

    def soft_forward(
        self, x: Tensor, logits: Tensor, group: Tensor | None
    ) -> tuple[Tensor, Choices, Tensor]:
        """Soft MoE: every token feeds every expert's slots, so nothing is chosen or dropped.
        For the record and the statistics, each token's one choice is the expert that wrote
        most of its output (that share as its gate); the auxiliary losses see the log of the
        per-expert shares as its logits. Returns ``(y, choices, logits)``."""
        y, probs = soft_moe(x, logits, group, self.experts, self.slots_per_expert)
        gates, expert_index = probs.max(dim=-1, keepdim=True)
        dropped = torch.zeros_like(expert_index, dtype=torch.bool)
        log_shares = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        return y, Choices(probs, gates, expert_index, None, dropped, None), log_shares

    def run_experts(self, x: Tensor, choices: Choices) -> Tensor:
        """The chosen experts applied to ``x``, combined with their gates: by the sorted
        dispatch, or by GShard's one-hot reference."""
        if self.dispatch_mode == "onehot":
            return onehot_moe(
                x, choices.expert_index, choices.gates, choices.position, choices.dropped,
                self.experts, choices.capacity,
            )  # fmt: skip
        return self.dispatch(x, choices.expert_index, choices.gates, choices.dropped)

    def shard(self, rank: int, world_size: int, group=None) -> None:
        """Keep this process's ``num_experts / world_size`` experts (``expert_parallel`` layers
        only; call on every process of ``group``, after ``torch.distributed`` is set up)."""
        if self.expert_parallel and world_size > 1 and self.experts.parallel is None:
            shard_experts(self.experts, rank, world_size, group)

    def dispatch(self, x: Tensor, expert_index: Tensor, gates: Tensor, dropped: Tensor) -> Tensor:
        """Kept choices -> sorted by expert -> expert GEMMs -> gate-weighted scatter back to tokens."""
        if self.experts.parallel is not None:
            group = self.experts.parallel.group
            args = (x, expert_index, gates, dropped, self.experts, self.num_experts, group)
            return parallel_dispatch(*args)
        choices = expert_index.shape[1]  # top_k, or E for expert choice
        choice_index, counts = sort_by_expert(expert_index, dropped, self.num_experts)
        expert_in = gather_tokens(x, choice_index, choices)
        expert_out = self.experts(expert_in, counts)
        return combine(expert_out, choice_index, gates, x.shape[0], choices)

    def _check_inputs(self, x: Tensor, modality: Tensor | None, group: Tensor | None) -> None:
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [N, dim={self.dim}], got {tuple(x.shape)}")
        if group is not None and (group.shape != x.shape[:1] or group.dtype.is_floating_point):
            raise ValueError(
                f"group must hold one integer id per token ([{x.shape[0]}]), got "
                f"{group.dtype} of shape {tuple(group.shape)}"
            )
        if modality is None:
            return
        if modality.dim() != 1:
            raise ValueError(f"modality must be 1-D [N], got shape {tuple(modality.shape)}")
        if modality.shape[0] != x.shape[0]:
            raise ValueError(
                f"modality has {modality.shape[0]} entries but x has {x.shape[0]} tokens"
            )
        if modality.dtype.is_floating_point or modality.dtype == torch.bool:
            raise ValueError(f"modality must hold integer ids, got dtype {modality.dtype}")
        num = len(self.modality_names)
        if modality.numel() and (modality.min() < 0 or modality.max() >= num):
            raise ValueError(
                f"modality ids must be in [0, {num}) for modality_names={self.modality_names}, "
                f"got ids in [{int(modality.min())}, {int(modality.max())}]"
            )


# The weight of V-MoE's importance and load losses for top-k routing where none is given: 4x
# vmoe's 0.005, with which experts of the first blocks go unused when every block has experts
# (docs/results.md, "Experts that earn their keep"); recipe=vmoe and recipe=limoe keep 0.005.
TOPK_BALANCE_WEIGHT = 0.02


def default_loss_weights(router: str) -> dict[str, float]:
    """The classic balancing losses' weights where none is given (None): for top-k routing
    V-MoE's importance and load losses at ``TOPK_BALANCE_WEIGHT`` each, over all tokens with
    the default ``loss_scope``, and no Switch/GShard load loss; none for expert choice
    (balanced by construction), Soft MoE (nothing to balance: every slot takes a full weighted
    average), which vmoe also trains without any auxiliary loss, or the modality router."""
    vmoe = TOPK_BALANCE_WEIGHT if router == "topk" else 0.0
    return {"importance": vmoe, "load": 0.0, "vmoe_load": vmoe}


def _check_config(
    num_experts: int, top_k: int, capacity_factor: float | None, capacity_multiple: int
) -> None:
    for name, value in (
        ("num_experts", num_experts),
        ("top_k", top_k),
        ("capacity_multiple", capacity_multiple),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if capacity_factor is not None and not isinstance(capacity_factor, (int, float)):
        raise ValueError(
            f"capacity_factor must be a number or None (dropless), got {capacity_factor!r}"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
    if capacity_multiple < 1:
        raise ValueError(f"capacity_multiple must be >= 1, got {capacity_multiple}")


def _check_router(
    router: str, capacity_factor: float | None, slots_per_expert: int, routers: tuple[str, ...]
) -> None:
    if router not in routers:
        raise ValueError(f"router must be one of {routers}, got {router!r}")
    if router == "expert_choice" and capacity_factor is None:
        raise ValueError(
            "router=expert_choice needs a capacity_factor (each expert takes "
            "capacity_factor * top_k * N / E tokens); null (dropless) has no meaning there"
        )
    if not isinstance(slots_per_expert, int) or slots_per_expert < 1:
        raise ValueError(f"slots_per_expert must be an integer >= 1, got {slots_per_expert!r}")


def _check_modality_router(
    router: str, num_experts: int, top_k: int, capacity_factor: float | None,
    modality_names: Sequence[str],
) -> None:  # fmt: skip
    if router != "modality":
        return
    if num_experts != len(modality_names) or top_k != 1:
        raise ValueError(
            f"router='modality' sends each token to its modality's expert: num_experts must be "
            f"{len(modality_names)} (one per modality {tuple(modality_names)}) and top_k 1, "
            f"got num_experts={num_experts}, top_k={top_k}"
        )
    if capacity_factor is not None:
        raise ValueError(
            f"router='modality' is dropless: capacity_factor must be None, got {capacity_factor}"
        )


def _check_eval_capacity(value: float | str | None, router: str) -> float | str | None:
    """None (the training factor), a number > 0, or "dropless" (not for expert choice,
    which needs a capacity)."""
    if value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    ):
        return value
    if value == "dropless" and router != "expert_choice":
        return value
    raise ValueError(
        f"eval_capacity_factor must be null (the training value), a number > 0 or 'dropless'"
        f"{' (not with router=expert_choice)' if router == 'expert_choice' else ''}, "
        f"got {value!r}"
    )


def _check_global_entropy(weight: float, min_experts: tuple[float, ...], num_experts: int) -> None:
    """With the loss on, S <= 1 never fires (log S <= 0 <= H) and S > num_experts can never
    be met (H <= log E): either is a config mistake."""
    if weight > 0 and any(not 1 < s <= num_experts for s in min_experts):
        raise ValueError(
            f"global_entropy_min_experts must be in (1, num_experts={num_experts}] while "
            f"global_entropy_weight > 0, got {list(min_experts)}"
        )


def _min_experts_per_modality(
    min_experts: float | Sequence[float], modality_names: tuple[str, ...]
) -> tuple[float, ...]:
    """S per modality id: a scalar applies to all; a sequence needs one entry per modality."""
    values = (float(min_experts),) if isinstance(min_experts, (int, float)) else tuple(min_experts)
    if len(values) not in (1, len(modality_names)):
        raise ValueError(
            f"global_entropy_min_experts must be a number or have one entry per modality "
            f"{modality_names}, got {min_experts}"
        )
    if any(s <= 0 for s in values):
        raise ValueError(f"global_entropy_min_experts must be > 0, got {min_experts}")
    return values
