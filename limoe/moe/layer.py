"""MoELayer: the sparse MLP of LIMoE / V-MoE, built from its parts (a ``Router``, the
``Experts``, the ``RouterLosses``) and run as a pipeline of named steps: route, run the
experts on the kept choices (sorted dispatch, GShard's one-hot reference, expert parallelism,
or Soft MoE's weighted slots), then the auxiliary losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dispatch import combine, empty_slots, fill_slots, gather_tokens, slot_rows, sort_by_expert
from .experts import Experts, ExpertShard
from .losses import RouterLosses
from .parallel import parallel_dispatch, shard_experts
from .reference import onehot_moe
from .routing import Router, RouterOutput, Routing, assign_slots
from .soft import soft_apply

__all__ = ["MoELayer"]


class MoELayer(nn.Module):
    """Sparse Mixture-of-Experts MLP over a flat token set ``x [N, dim]``, made of a
    ``router`` (who goes where: ``routers``), the ``experts`` (E MLPs in batched weights) and
    the auxiliary ``losses`` (None: LIMoE's, ``RouterLosses()``).

    Each token goes to its chosen experts; an expert serves at most C tokens
    (``compute_capacity`` at ``capacity_factor``; None: dropless), Batch Priority Routing
    decides who is dropped when it is full, and a dropped choice contributes 0 (the block's
    residual carries the token). ``forward`` returns ``(y [N, dim], Routing)``;
    ``routing.aux_loss`` is the weighted auxiliary loss for the trainer to add.

    ``modality [N]`` (ids into ``losses.modality_names``) only affects the losses: LIMoE's
    entropy losses are per modality, the classic ones over all tokens or per modality
    (``RouterLosses.scope``); routing, capacity and BPR are shared by all tokens, so
    modalities compete for the same experts.

    How the experts run is chosen here, once (``path``): Soft MoE's weighted slots for a
    router that ``mixes``; else ``dispatch``: ``sorted`` (default) permutes the kept choices
    into per-expert slices (MegaBlocks/ScatterMoE; ``Experts.gemm_path`` picks the GEMMs),
    ``onehot`` is GShard's dense one-hot einsum, the reference for tests and benchmarks
    (same routing, same result, more memory). ``shard`` switches a sorted layer to expert
    parallelism (``expert_parallel``: experts spread over the processes, tokens travel by
    all-to-all) once ``torch.distributed`` is set up; until then the layer holds every expert.

    ``eval_capacity_factor`` is the capacity factor in ``eval()`` mode, as V-MoE's: None keeps
    the training one, a number replaces it, ``"dropless"`` serves every choice.
    ``shared_expert`` (DeepSeekMoE) is a dense MLP every real token runs beside its experts.
    """

    DISPATCH_MODES = ("sorted", "onehot")

    def __init__(
        self,
        router: Router,
        experts: Experts,
        losses: RouterLosses | None = None,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | str | None = None,
        dispatch: str = "sorted",
        expert_parallel: bool = False,
        shared_expert: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if dispatch not in self.DISPATCH_MODES:
            raise ValueError(
                f"model.moe.dispatch must be one of {self.DISPATCH_MODES}, got {dispatch!r}"
            )
        if experts.num_experts != router.num_experts:
            raise ValueError(f"the router has {router.num_experts} experts to choose from, "
                             f"the experts are {experts.num_experts}")  # fmt: skip
        self.capacity_factor = _check_capacity(capacity_factor)
        losses = (losses or RouterLosses()).for_router(router.balance_weight)
        losses.check(router.num_experts)
        router.check(capacity_factor, losses.modality_names)
        self.eval_capacity_factor = _check_eval_capacity(eval_capacity_factor, router)
        if expert_parallel and (not router.shards or dispatch != "sorted"):
            raise ValueError(
                "model.moe.expert_parallel needs dispatch=sorted and a router that shards "
                f"(topk or expert_choice), got dispatch={dispatch!r}, router={router.name!r}"
            )
        self.router, self.experts, self.losses = router, experts, losses
        self.shared_expert = shared_expert
        self.expert_parallel = expert_parallel
        self.path = "soft" if router.mixes else dispatch
        self.num_experts = router.num_experts

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}, path={self.path}"

    @property
    def active_capacity_factor(self) -> float | None:
        """The capacity factor of this call: the training one, or in ``eval()`` mode
        ``eval_capacity_factor`` where set (``"dropless"``: None)."""
        if self.training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return None if self.eval_capacity_factor == "dropless" else self.eval_capacity_factor

    @property
    def dim(self) -> int:
        return self.experts.w1.shape[1]

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def modality_names(self) -> tuple[str, ...]:
        return self.losses.modality_names

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
        out = self.router(x, modality, sequence, self.active_capacity_factor, valid)
        if valid is not None:  # padding takes no expert (routers with a capacity drop it too)
            out = out._replace(dropped=out.dropped | ~valid.unsqueeze(1))
        y = self.run_experts(x, out, valid).to(x.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert(x).to(y.dtype)
            y = y + (shared if valid is None else shared * valid.unsqueeze(1))
        # None: a router with nothing to regularise
        aux_losses = {} if out.scores is None else self.losses(out.scores, modality, valid)
        routing = Routing(
            expert_index=out.expert_index, gates=out.gates, dropped=out.dropped,
            probs=out.probs, modality=modality, capacity=out.capacity, aux_losses=aux_losses,
            aux_loss=self.losses.total(aux_losses).to(x.device), router=self.router.name,
            experts_choose=self.router.experts_choose, sequence=sequence, position=position,
            valid=valid, limit=out.limit,
        )  # fmt: skip
        return y, routing

    def run_experts(self, x: Tensor, out: RouterOutput, valid: Tensor | None) -> Tensor:
        """The experts applied to ``x`` as the router decided, by the layer's ``path``."""
        if self.path == "soft":
            return soft_apply(x, out.mixing, self.experts)
        if self.path == "onehot":
            slot = out.slot
            if slot is None:  # dropless routers skip the slots the sorted dispatch does not need
                slot = assign_slots(out.expert_index, self.num_experts, None)[0]
            return onehot_moe(
                x, out.expert_index, out.gates, slot, out.dropped, self.experts, out.capacity
            )
        if self.path == "parallel":
            group = self.experts.parallel.group
            args = (x, out.expert_index, out.gates, out.dropped, self.experts, self.num_experts)
            return parallel_dispatch(*args, group)
        droppable = out.capacity is not None or valid is not None
        dropped = out.dropped if droppable else None  # None: dropless, nothing to mask
        return self.dispatch(x, out.expert_index, out.gates, dropped, out.capacity)

    def shard(self, rank: int, world_size: int, group=None) -> None:
        """Keep this process's ``num_experts / world_size`` experts and run them by all-to-all
        (``expert_parallel`` layers only; call on every process of ``group``, after
        ``torch.distributed`` is set up)."""
        if self.expert_parallel and world_size > 1 and self.path != "parallel":
            shard_experts(self.experts, rank, world_size, group)
            self.path = "parallel"

    @property
    def expert_shard(self) -> ExpertShard | None:
        """Which block of the experts this process holds (``shard``); None: all of them."""
        return self.experts.parallel

    @torch.no_grad()
    def weight_norms(self) -> dict[str, list[float] | float]:
        """Each expert's ``w1`` and ``w2`` norms (this process's experts) and the router's
        weight norm where it learns one: what a routing history records per layer."""
        norms = {w: getattr(self.experts, w).flatten(1).norm(dim=1).tolist() for w in ("w1", "w2")}
        weight = getattr(self.router, "weight", None)
        if isinstance(weight, Tensor):
            norms["router"] = float(weight.norm())
        return norms

    def router_grad_norm(self) -> Tensor | None:
        """The norm of the router weights' gradient (None: no learned router, or no gradient)."""
        weight = getattr(self.router, "weight", None)
        return None if weight is None or weight.grad is None else weight.grad.norm().float()

    def dispatch(
        self, x: Tensor, expert_index: Tensor, gates: Tensor, dropped: Tensor | None,
        capacity: int | None = None,
    ) -> Tensor:  # fmt: skip
        """Kept choices -> sorted by expert -> expert GEMMs (on the rows, or on the ``[E, C]``
        buffer) -> gate-weighted sum back to tokens. No step waits on the device on the
        grouped and padded paths; ``capacity`` (None: dropless) sizes the padded buffer, and
        ``dropped`` None says nothing is dropped (no row needs a mask)."""
        choices = sort_by_expert(expert_index, dropped, self.num_experts)
        rows = gather_tokens(x, choices, expert_index.shape[1])  # k: top_k, or E (expert choice)
        path = self.experts.gemm_path(x, capacity)
        if path == "loop":  # it gives the dropped rows zeros, both ways: nothing to mask
            choices = choices._replace(kept=None)
        if path != "padded":
            out = self.experts(rows, choices.offsets, path, every_row_kept=dropped is None,
                               row_expert=choices.expert)  # fmt: skip
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


def _check_capacity(capacity_factor: float | None) -> float | None:
    if capacity_factor is not None and (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, int | float)
        or capacity_factor <= 0
    ):
        raise ValueError(f"model.moe.capacity_factor must be a number > 0 or null (dropless), "
                         f"got {capacity_factor!r}")  # fmt: skip
    return capacity_factor


def _check_eval_capacity(value: float | str | None, router: Router) -> float | str | None:
    """None (the training factor), a number > 0, or "dropless" (not for expert choice,
    which needs a capacity)."""
    if value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    ):
        return value
    if value == "dropless" and router.capacity != "required":
        return value
    not_here = f" (not with router={router.name})" if router.capacity == "required" else ""
    raise ValueError(
        "model.moe.eval_capacity_factor must be null (the training value), a number > 0 or "
        f"'dropless'{not_here}, got {value!r}"
    )
