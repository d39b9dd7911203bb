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

from limoe.moe import ExpertShard, MoELayer, gather_blocks


def expert_shard(model: nn.Module) -> ExpertShard | None:
    """Where this process's experts sit (the same for every layer), None when unsharded."""
    return next(
        (m.experts.parallel for m in model.modules()
         if isinstance(m, MoELayer) and m.experts.parallel is not None),
        None,
    )  # fmt: skip


def parallel_experts(model: nn.Module) -> list[Tensor]:
    """The expert weights this process holds a block of (empty before sharding)."""
    return [
        p
        for layer in model.modules()
        if isinstance(layer, MoELayer) and layer.experts.parallel is not None
        for p in layer.experts.parameters()
    ]


def shard_experts(module: nn.Module, model: nn.Module, rank: int, world_size: int) -> None:
    """Keep this rank's ``E / world_size`` experts of every ``expert_parallel`` layer of
    ``model`` (a part of ``module``, the LightningModule DDP wraps). Call on every rank,
    before DDP wraps the module."""
    if not any(isinstance(m, MoELayer) and m.expert_parallel for m in model.modules()):
        return
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


def grad_norm(params: Sequence[Tensor], model: nn.Module) -> Tensor:
    """The L2 norm of the gradients of ``params`` (``clip_grad_norm_``'s total norm). With
    expert parallelism each rank holds a part of the experts, so their squared norms are
    summed over the ranks."""
    shard = expert_shard(model)
    grads = [p.grad for p in params if p.grad is not None]
    if shard is None:
        return torch.nn.utils.get_total_norm(grads)
    sharded = {id(p) for p in parallel_experts(model)}
    shared = [p.grad for p in params if p.grad is not None and id(p) not in sharded]
    local = [p.grad for p in params if p.grad is not None and id(p) in sharded]
    shared_squared, expert_squared = (_squared_norm(g, params[0]) for g in (shared, local))
    torch.distributed.all_reduce(expert_squared, group=shard.group)
    return (shared_squared + expert_squared).sqrt()


def _squared_norm(grads: list[Tensor], like: Tensor) -> Tensor:
    return torch.nn.utils.get_total_norm(grads) ** 2 if grads else like.new_zeros(())


def _sharded_indices(params: Sequence[Tensor], model: nn.Module) -> list[int]:
    sharded = {id(p) for p in parallel_experts(model)}
    return [i for i, p in enumerate(params) if id(p) in sharded]


def gather_optimizer_states(checkpoint: dict, params: Sequence[Tensor], model: nn.Module) -> None:
    """AdamW's moments of every expert, gathered from all ranks into ``checkpoint`` (a
    collective, like the weights' state dict hook), so the checkpoint loads at any size.
    ``params`` are the weights in the optimiser's order, which indexes its state."""
    shard = expert_shard(model)
    for optimizer_state in checkpoint.get("optimizer_states", []):
        for i in _sharded_indices(params, model):
            zeros = torch.zeros_like(params[i])  # AdamW's state, for a weight never updated
            fresh = {"step": torch.zeros(()), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
            # A new dict: the optimiser's state_dict() shares its per-weight dicts with the
            # live optimiser, which must keep this rank's block.
            state = dict(optimizer_state["state"].get(i, fresh))
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = gather_blocks(state[key], shard)
            optimizer_state["state"][i] = state


def local_optimizer_states(checkpoint: dict, params: Sequence[Tensor], model: nn.Module) -> None:
    """This rank's block of the full expert moments in ``checkpoint`` (the weights are
    sliced by ``limoe.moe.parallel``'s load hook)."""
    shard = expert_shard(model)
    for optimizer_state in checkpoint.get("optimizer_states", []):
        for i in _sharded_indices(params, model):
            full = params[i].shape[0] * shard.world_size
            for key, value in optimizer_state["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.ndim and value.shape[0] == full:
                    optimizer_state["state"][i][key] = shard.block(value)
