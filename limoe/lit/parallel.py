"""Expert parallelism in training: a LightningModule's MoE layers split across the DDP
processes, the whole model's gradient norm, and optimiser states that hold every expert.

``limoe.moe.parallel`` moves the tokens; this module fits that into Lightning's DDP:
the experts' weights leave DDP's gradient averaging (each rank holds different experts) and
their gradients, which sum every rank's loss through the all-to-all, are divided by the
world size to match the mean DDP takes of the replicated weights' gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from limoe.moe import MoELayer


def parallel_experts(model: nn.Module) -> list[Tensor]:
    """The expert weights this process holds a block of (empty before sharding)."""
    return [
        p
        for layer in model.modules()
        if isinstance(layer, MoELayer) and layer.experts.parallel is not None
        for p in layer.experts.parameters()
    ]


def shard_experts(module: nn.Module, model: nn.Module, rank: int, world_size: int):
    """Keep this rank's ``E / world_size`` experts of every ``expert_parallel`` layer of
    ``model`` (a part of ``module``, the LightningModule DDP wraps); returns their process
    group, None where no layer is expert-parallel. Call on every rank, before DDP wraps."""
    if not any(isinstance(m, MoELayer) and m.expert_parallel for m in model.modules()):
        return None
    # A process group of their own: DDP all-reduces gradients on the default group during
    # backward, and interleaving the experts' all-to-alls with it would pair mismatched
    # collectives across ranks.
    group = torch.distributed.new_group(list(range(world_size)))
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            layer.shard_experts(rank, world_size, group)
    sharded = {id(p) for p in parallel_experts(model)}
    names = [n for n, p in module.named_parameters() if id(p) in sharded]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    for p in parallel_experts(model):
        p.register_hook(lambda grad: grad / world_size)
    return group


def grad_norm(model: nn.Module, group=None) -> Tensor:
    """The L2 norm of the whole model's gradient. Each rank holds a part of the parallel
    experts, so their squared norms are summed over the ranks of ``group``."""
    experts = parallel_experts(model)
    sharded = {id(p) for p in experts}
    shared = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in sharded]
    device = next(model.parameters()).device
    squared = (
        torch.nn.utils.get_total_norm(shared) ** 2 if shared else torch.zeros((), device=device)
    )
    if experts:
        local = [p.grad for p in experts if p.grad is not None]
        expert_squared = torch.nn.utils.get_total_norm(local) ** 2 if local else squared * 0
        torch.distributed.all_reduce(expert_squared, group=group)
        squared = squared + expert_squared
    return squared.sqrt()


def _sharded_indices(params: Sequence[Tensor], model: nn.Module) -> list[int]:
    sharded = {id(p) for p in parallel_experts(model)}
    return [i for i, p in enumerate(params) if id(p) in sharded]


def gather_optimizer_states(
    checkpoint: dict, params: Sequence[Tensor], model: nn.Module, world_size: int, group=None
) -> None:
    """AdamW's moments of every expert, gathered from all ranks into ``checkpoint`` (a
    collective, like the weights' state dict hook), so the checkpoint loads at any size.
    ``params`` are the weights in the optimiser's order, which indexes its state."""
    for optimizer_state in checkpoint.get("optimizer_states", []):
        for i in _sharded_indices(params, model):
            zeros = torch.zeros_like(params[i])  # AdamW's state, for a weight never updated
            fresh = {"step": torch.zeros(()), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
            # A new dict: the optimiser's state_dict() shares its per-weight dicts with the
            # live optimiser, which must keep this rank's block.
            state = dict(optimizer_state["state"].get(i, fresh))
            for key in ("exp_avg", "exp_avg_sq"):
                blocks = [torch.empty_like(state[key]) for _ in range(world_size)]
                torch.distributed.all_gather(blocks, state[key].contiguous(), group=group)
                state[key] = torch.cat(blocks)
            optimizer_state["state"][i] = state


def local_optimizer_states(
    checkpoint: dict, params: Sequence[Tensor], model: nn.Module, rank: int, world_size: int
) -> None:
    """This rank's block of the full expert moments in ``checkpoint`` (the weights are
    sliced by ``limoe.moe.parallel``'s load hook)."""
    for optimizer_state in checkpoint.get("optimizer_states", []):
        for i in _sharded_indices(params, model):
            local = params[i].shape[0]
            for key, value in optimizer_state["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.ndim and value.shape[0] == local * world_size:
                    optimizer_state["state"][i][key] = value[rank * local : (rank + 1) * local]
