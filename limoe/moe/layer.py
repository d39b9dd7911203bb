"""MoELayer: the sparse MLP of LIMoE / V-MoE as a pipeline of named steps: route (a
``Router``), then the experts on the kept choices (sorted dispatch, GShard's one-hot
reference, expert parallelism, or Soft MoE's weighted slots), then the auxiliary losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .dispatch import combine, empty_slots, fill_slots, gather_tokens, slot_rows, sort_by_expert
from .experts import Experts
from .losses import LOSS_NAMES, LOSS_SCOPES, router_losses, weighted_sum
from .parallel import parallel_dispatch, shard_experts
from .reference import onehot_moe
from .routers import ROUTERS, TOPK_BALANCE_WEIGHT, make_router
from .routing import MODALITY_NAMES, Router, Routing, assign_slots
from .soft import soft_apply

__all__ = ["MoELayer", "TOPK_BALANCE_WEIGHT", "default_loss_weights"]


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
    ``gemm`` is how the sorted path runs the experts' GEMMs (``Experts.gemm_path``: ``auto``
    takes, on a GPU, a path with no host synchronisation: PyTorch's grouped GEMM in bf16 on
    Hopper and later, else the ``[E, C]`` buffer at a capacity; on a CPU a loop of ``addmm``).

    ``router`` picks who chooses, by name (``routers.ROUTERS``) or as a ``Router``: ``topk``
    (tokens choose experts, as LIMoE), ``expert_choice`` (each expert takes its C most
    confident tokens, Zhou et al. 2022; needs a ``capacity_factor``; its routing record has
    k = E choices per token, ``dropped`` where an expert did not pick it), ``soft`` (Soft
    MoE, Puigcerver et al. 2023: ``slots_per_expert`` slots per expert and per sequence, each
    a weighted average of the sequence's tokens; the record's single choice is the expert that
    wrote most of the token's output) or ``modality`` (no learned routing: token of modality
    m goes to expert m with gate 1, as the multiway MLPs of VLMo and BEiT-3; ``num_experts``
    equals the number of modalities, it is dropless and has no auxiliary losses). The router
    options (``top_k`` ... ``router_init_std``, ``slots_per_expert``) go to ``make_router``.

    ``eval_capacity_factor`` is the capacity factor in ``eval()`` mode, as V-MoE's: None keeps
    the training one, a number replaces it, ``"dropless"`` serves every choice.

    ``expert_parallel=True`` lets ``shard`` spread the experts over the processes of
    a ``torch.distributed`` group once it exists (``parallel``: tokens travel by all-to-all);
    until then, and on one process, the layer holds every expert.

    The defaults are those of ``conf/model/limoe.yaml``'s ``moe`` node, LIMoE's recipe
    (dropless top-1 with gating noise and a LeCun-normal router; V-MoE's importance and load
    losses at the router's ``balance_weight``, 0.02 for top-k, 0 for the others; both entropy
    losses at 0.01, S = 2 per modality), so ``MoELayer(dim, hidden, E)`` is the layer the
    default LIMoE builds; a test keeps the two equal.
    """

    DISPATCH_MODES = ("sorted", "onehot")
    ROUTERS = tuple(ROUTERS)

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
        router: str | Router = "topk",
        slots_per_expert: int = 1,
        expert_parallel: bool = False,
        router_init_std: float | None = None,
    ) -> None:
        super().__init__()
        _check_config(num_experts, top_k, capacity_factor, capacity_multiple)
        if dispatch not in self.DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {self.DISPATCH_MODES}, got {dispatch!r}")
        if not isinstance(slots_per_expert, int) or slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be an integer >= 1, got {slots_per_expert!r}")
        if isinstance(router, str):
            router = make_router(
                router, dim, num_experts, slots_per_expert, top_k=top_k,
                batch_priority=batch_priority, renormalize_gates=renormalize_gates,
                noisy_gating=noisy_gating, capacity_multiple=capacity_multiple,
                init_std=router_init_std,
            )  # fmt: skip
        router.check(top_k, capacity_factor, modality_names)
        self.eval_capacity_factor = _check_eval_capacity(eval_capacity_factor, router)
        if expert_parallel and (not router.shards or dispatch != "sorted"):
            raise ValueError(
                "expert_parallel needs dispatch='sorted' and router 'topk' or 'expert_choice', "
                f"got dispatch={dispatch!r}, router={router.name!r}"
            )
        self.expert_parallel = expert_parallel
        self.dispatch_mode = dispatch
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.modality_names = tuple(modality_names)
        self.min_experts = _min_experts_per_modality(
            global_entropy_min_experts, self.modality_names
        )
        _check_global_entropy(global_entropy_weight, self.min_experts, num_experts)
        if loss_scope not in LOSS_SCOPES:
            raise ValueError(f"loss_scope must be one of {LOSS_SCOPES}, got {loss_scope!r}")
        self.loss_scope = loss_scope
        unset = default_loss_weights(type(router))
        given = (importance_weight, load_weight, vmoe_load_weight)
        weights = tuple(unset[n] if w is None else w for n, w in zip(LOSS_NAMES, given))
        weights += (z_loss_weight, local_entropy_weight, global_entropy_weight)
        self.loss_weights = dict(zip(LOSS_NAMES, weights))
        self.router = router
        self.experts = Experts(
            num_experts, dim, hidden_dim, act_layer=act_layer, drop=drop, gemm=gemm
        )

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}, dispatch={self.dispatch_mode}"

    @property
    def active_capacity_factor(self) -> float | None:
        """The capacity factor of this call: the training one, or in ``eval()`` mode
        ``eval_capacity_factor`` where set (``"dropless"``: None)."""
        if self.training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return None if self.eval_capacity_factor == "dropless" else self.eval_capacity_factor

    def forward(
        self,
        x: Tensor,
        modality: Tensor | None = None,
        sequence: Tensor | None = None,
        position: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Routing]:
        """Route, run the experts, add the losses; returns ``(y [N, dim] in x.dtype, routing)``.

        ``sequence`` and ``position [N]`` say where each token came from (``TokenOrigin``):
        the record carries them, and Soft MoE averages within one sequence of one modality
        (None: all tokens are one group). ``valid [N]`` (bool; None: all) marks the real
        tokens: the others (text padding, routed so that every shape is known in advance) are
        dropped, take no capacity and no part in the losses and statistics; their output is 0."""
        self._check_inputs(x, modality, sequence, valid)
        modality = None if modality is None else modality.long()
        routing = self.router(x, modality, sequence, self.active_capacity_factor, valid)
        routing.valid = valid
        if valid is not None:  # padding takes no expert (routers with a capacity drop it too)
            routing.dropped = routing.dropped | ~valid.unsqueeze(1)
        y = self.run_experts(x, routing)
        routing.modality, routing.sequence, routing.position = modality, sequence, position
        if routing.scores is not None:  # None: a router with nothing to regularise
            routing.aux_losses = router_losses(
                routing.scores, modality, self.modality_names, self.min_experts, self.loss_scope,
                valid,
            )  # fmt: skip
        routing.aux_loss = weighted_sum(routing.aux_losses, self.loss_weights).to(x.device)
        return y.to(x.dtype), routing

    def run_experts(self, x: Tensor, routing: Routing) -> Tensor:
        """The experts applied to ``x`` as ``routing`` says: Soft MoE's weighted slots, GShard's
        one-hot reference, or the sorted dispatch of the kept choices."""
        if routing.mixing is not None:
            return soft_apply(x, routing.mixing, self.experts)
        if self.dispatch_mode == "onehot":
            slot = routing.slot
            if slot is None:  # dropless routers skip the slots the sorted dispatch does not need
                slot = assign_slots(routing.expert_index, self.num_experts, None)[0]
            return onehot_moe(
                x, routing.expert_index, routing.gates, slot, routing.dropped, self.experts,
                routing.capacity,
            )  # fmt: skip
        droppable = routing.capacity is not None or routing.valid is not None
        dropped = routing.dropped if droppable else None  # None: dropless, nothing to mask
        return self.dispatch(x, routing.expert_index, routing.gates, dropped, routing.capacity)

    def shard(self, rank: int, world_size: int, group=None) -> None:
        """Keep this process's ``num_experts / world_size`` experts (``expert_parallel`` layers
        only; call on every process of ``group``, after ``torch.distributed`` is set up)."""
        if self.expert_parallel and world_size > 1 and self.experts.parallel is None:
            shard_experts(self.experts, rank, world_size, group)

    def dispatch(
        self, x: Tensor, expert_index: Tensor, gates: Tensor, dropped: Tensor | None,
        capacity: int | None = None,
    ) -> Tensor:  # fmt: skip
        """Kept choices -> sorted by expert -> expert GEMMs (on the rows, or on the ``[E, C]``
        buffer) -> gate-weighted sum back to tokens. No step waits on the device on the
        grouped and padded paths; ``capacity`` (None: dropless) sizes the padded buffer, and
        ``dropped`` None says nothing is dropped (no row needs a mask)."""
        if self.experts.parallel is not None:
            group = self.experts.parallel.group
            args = (x, expert_index, gates, dropped, self.experts, self.num_experts, group)
            return parallel_dispatch(*args)
        choices = sort_by_expert(expert_index, dropped, self.num_experts)
        rows = gather_tokens(x, choices, expert_index.shape[1])  # k: top_k, or E (expert choice)
        path = self.experts.gemm_path(x, capacity)
        if path == "loop":  # it gives the dropped rows zeros, both ways: nothing to mask
            choices = choices._replace(kept=None)
        if path != "padded":
            out = self.experts(rows, choices.offsets, path, every_row_kept=dropped is None)
            return combine(out, choices, gates)
        if capacity is None:  # dropless: the largest slice sizes the buffer (read on the host)
            capacity = int(choices.counts().max()) if rows.shape[0] else 0
        slots = slot_rows(choices, capacity)
        buffer = fill_slots(rows, slots, choices.row_kept)
        out = self.experts.forward_padded(buffer.view(self.num_experts, capacity, -1))
        return combine(empty_slots(out.flatten(0, 1), slots, choices.row_kept), choices, gates)

    def _check_inputs(
        self, x: Tensor, modality: Tensor | None, sequence: Tensor | None, valid: Tensor | None
    ) -> None:
        """Shapes and dtypes on the host; the modality ids' range on the device (a check on
        the host would make it wait for the device at every call)."""
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [N, dim={self.dim}], got {tuple(x.shape)}")
        if sequence is not None and (
            sequence.shape != x.shape[:1] or sequence.dtype.is_floating_point
        ):
            raise ValueError(
                f"sequence must hold one integer id per token ([{x.shape[0]}]), got "
                f"{sequence.dtype} of shape {tuple(sequence.shape)}"
            )
        if valid is not None and (valid.shape != x.shape[:1] or valid.dtype != torch.bool):
            raise ValueError(
                f"valid must hold one bool per token ([{x.shape[0]}]), got {valid.dtype} of "
                f"shape {tuple(valid.shape)}"
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
        # Checked on the device: a RuntimeError here on a CPU, a device-side assert on a GPU.
        torch._assert_async(
            ((modality >= 0) & (modality < num)).all(),
            f"modality ids must be in [0, {num}) for modality_names={self.modality_names}",
        )


def default_loss_weights(router: str | type[Router]) -> dict[str, float]:
    """The classic balancing losses' weights where none is given (None): the router's
    ``balance_weight`` for V-MoE's importance and load losses (top-k: ``TOPK_BALANCE_WEIGHT``;
    0 for expert choice, balanced by construction, Soft MoE, nothing to balance, which vmoe
    also trains without any auxiliary loss, and the modality router), and no Switch/GShard
    load loss."""
    cls = ROUTERS[router] if isinstance(router, str) else router
    return {"importance": cls.balance_weight, "load": 0.0, "vmoe_load": cls.balance_weight}


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


def _check_eval_capacity(value: float | str | None, router: Router) -> float | str | None:
    """None (the training factor), a number > 0, or "dropless" (not for expert choice,
    which needs a capacity)."""
    if value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    ):
        return value
    if value == "dropless" and router.capacity != "required":
        return value
    raise ValueError(
        f"eval_capacity_factor must be null (the training value), a number > 0 or 'dropless'"
        f"{f' (not with router={router.name})' if router.capacity == 'required' else ''}, "
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
