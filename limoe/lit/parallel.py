"""Expert parallelism in training: a LightningModule's MoE layers split across the DDP
processes, the whole model's gradient norm, and optimiser states that hold every expert.

``limoe.moe.parallel`` moves the tokens; this module fits that into Lightning's DDP:
the experts' weights leave DDP's gradient averaging (each rank holds different experts) and
their gradients, which sum every rank's loss through the all-to-all, are divided by the
world size to match the mean DDP takes of the replicated weights' gradients. The
``ExpertParallel`` callback does it at the right moments; ``ContrastiveModule`` brings it
along (``configure_callbacks``), so every run of a model with ``expert_parallel`` layers
has it.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from limoe.moe import ExpertShard, MoELayer, gather_blocks


def expert_shard(model: nn.Module) -> ExpertShard | None:
    """Where this process's experts sit (the same for every layer), None when unsharded."""
    return next(
        (m.expert_shard for m in model.modules()
         if isinstance(m, MoELayer) and m.expert_shard is not None),
        None,
    )  # fmt: skip


def sharded_expert_params(model: nn.Module) -> list[Tensor]:
    """The expert weights this process holds a block of (empty before sharding)."""
    return [
        p
        for layer in model.modules()
        if isinstance(layer, MoELayer) and layer.expert_shard is not None
        for p in layer.experts.parameters()
    ]


def exclude_from_ddp(module: nn.Module, names: Sequence[str]) -> None:
    """Keep the parameters ``names`` of ``module`` out of DDP's gradient averaging (call before
    DDP wraps it). torch's only way is the private ``DistributedDataParallel.
    _set_params_and_buffers_to_ignore_for_model``; this is the one place that calls it
    (``tests/test_expert_parallel.py`` fails if it stops working)."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(names))


def distribute_experts(module: nn.Module, model: nn.Module, rank: int, world_size: int) -> None:
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
            layer.shard(rank, world_size, group)
    sharded = {id(p) for p in sharded_expert_params(model)}
    exclude_from_ddp(module, [n for n, p in module.named_parameters() if id(p) in sharded])
    for p in sharded_expert_params(model):
        p.register_hook(lambda grad: grad / world_size)


def grad_norm(params: Sequence[Tensor], model: nn.Module) -> Tensor:
    """The L2 norm of the gradients of ``params`` (``clip_grad_norm_``'s total norm). With
    expert parallelism each rank holds a part of the experts, so their squared norms are
    summed over the ranks."""
    shard = expert_shard(model)
    grads = [p.grad for p in params if p.grad is not None]
    if shard is None:
        return torch.nn.utils.get_total_norm(grads)
    sharded = {id(p) for p in sharded_expert_params(model)}
    shared = [p.grad for p in params if p.grad is not None and id(p) not in sharded]
    local = [p.grad for p in params if p.grad is not None and id(p) in sharded]
    shared_squared, expert_squared = (_squared_norm(g, params[0]) for g in (shared, local))
    torch.distributed.all_reduce(expert_squared, group=shard.group)
    return (shared_squared + expert_squared).sqrt()


def _squared_norm(grads: list[Tensor], like: Tensor) -> Tensor:
    return torch.nn.utils.get_total_norm(grads) ** 2 if grads else like.new_zeros(())


def _sharded_indices(params: Sequence[Tensor], model: nn.Module) -> list[int]:
    sharded = {id(p) for p in sharded_expert_params(model)}
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


class ExpertParallel(L.Callback):
    """``model.moe.expert_parallel`` under DDP: split the experts over the processes before
    DDP wraps the module, and keep every expert's AdamW moments in checkpoints (gathered on
    save, this rank's block taken on load), so a checkpoint loads at any world size.
    Nothing happens on one process or for a model without ``expert_parallel`` layers."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1 and not sharded_expert_params(pl_module.model):
            distribute_experts(pl_module, pl_module.model, trainer.global_rank, trainer.world_size)

    def on_save_checkpoint(self, trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if sharded_expert_params(pl_module.model):
            gather_optimizer_states(checkpoint, pl_module.optimizer_params(), pl_module.model)

    def on_load_checkpoint(self, trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if sharded_expert_params(pl_module.model):
            local_optimizer_states(checkpoint, pl_module.optimizer_params(), pl_module.model)
