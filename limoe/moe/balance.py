"""Auxiliary-loss-free balancing (DeepSeek-V3): the step that moves every top-k router's expert
bias once per optimiser step, from the tokens its experts were chosen by in all the step's
micro-batches on all processes. The routers count in their forward (``TopKRouter.
count_tokens``); a training loop calls ``update_expert_bias`` after ``optimizer.step()``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .routers import TopKRouter


def bias_routers(model: nn.Module) -> list[TopKRouter]:
    """The routers of ``model`` that balance by bias (``balance="bias"``), in module order."""
    return [m for m in model.modules() if isinstance(m, TopKRouter) and m.balance == "bias"]


@torch.no_grad()
def update_expert_bias(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Update every bias-balanced router of ``model`` from the counts since the last update,
    summed over the processes of ``group`` (default: all) in one all-reduce, as torchtitan
    does, so every process moves the same bias. Call once per optimiser step, after the last
    micro-batch's backward (torchtitan once updated per micro-batch: a bug it fixed). Returns
    how many routers were updated."""
    routers = bias_routers(model)
    if not routers:
        return 0
    counts = torch.cat([r.expert_tokens.flatten() for r in routers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    sizes = [r.expert_tokens.numel() for r in routers]
    for router, count in zip(routers, counts.split(sizes)):
        router.update_bias(count.view_as(router.expert_tokens))
    return len(routers)
