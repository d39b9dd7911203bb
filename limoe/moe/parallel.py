"""Expert parallelism: each of W processes holds E / W experts and tokens travel to them.

The sorted dispatch extended across processes (GShard / DeepSpeed-MoE style):

1. route and sort the kept choices by expert, locally. Rank r owns experts
   ``[r * E/W, (r + 1) * E/W)``, so sorting by expert also groups rows by destination;
2. ``exchange_counts``: an all-to-all of the per-expert counts tells each rank how many rows
   it receives from each source for each of its experts;
3. ``all_to_all`` the rows (autograd-aware: gradients take the reverse trip);
4. regroup the received rows by local expert, run the local ``Experts``, undo the regrouping;
5. ``all_to_all`` the outputs back and combine them with the gates, locally.

Routing, capacity and Batch Priority Routing stay decisions over each process's own tokens,
so rank r's output equals the single-process layer applied to rank r's tokens. The experts'
gradients sum every rank's loss; data-parallel training divides them by W to match the
average that DDP takes of the replicated weights (``ContrastiveModule.setup``).

State dicts always hold the full ``[E, ...]`` expert weights: ``shard_experts`` registers
hooks that gather them from every rank on save and take this rank's block on load, so a
checkpoint loads at any world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_to_all_single

from .dispatch import combine, gather_tokens, sort_by_expert
from .experts import Experts, ExpertShard

EXPERT_WEIGHTS = ("w1", "b1", "w2", "b2")


def exchange_counts(counts: Tensor, world_size: int, group=None) -> Tensor:
    """``received [W, E/W]``: rows that each source rank sends to each local expert, from this
    rank's ``counts [E]`` (rows per global expert)."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received.view(world_size, -1)


def exchange(rows: Tensor, send: list[int], receive: list[int], group=None) -> Tensor:
    """All-to-all of ``rows`` split ``send`` (rows per destination) into a tensor split
    ``receive`` (rows per source); differentiable (backward sends the gradients back)."""
    out = rows.new_empty(sum(receive), *rows.shape[1:])
    return all_to_all_single(out, rows.contiguous(), receive, send, group=group)


def parallel_dispatch(
    x: Tensor,
    expert_index: Tensor,
    gates: Tensor,
    dropped: Tensor,
    experts: Experts,
    num_experts: int,
    group=None,
) -> Tensor:
    """``MoELayer.dispatch`` with the experts spread over the processes of ``group``."""
    world_size = dist.get_world_size(group)
    choices = sort_by_expert(expert_index, dropped, num_experts)
    counts = choices.counts()
    kept = int(choices.offsets[-1])  # the all-to-all's sizes are read on the host
    rows = gather_tokens(x, choices, expert_index.shape[1])[:kept]
    received = exchange_counts(counts, world_size, group)  # [source, local expert]
    send = counts.view(world_size, -1).sum(1).tolist()
    receive = received.sum(1).tolist()
    arrived = exchange(rows, send, receive, group)  # grouped by source, then by expert
    local = torch.arange(received.shape[1], device=x.device).repeat(world_size)
    by_expert = torch.sort(local.repeat_interleave(received.flatten()), stable=True).indices
    out = experts(arrived[by_expert], received.sum(0).cumsum(0))
    if out.shape[0] == 0:
        # No rows for this rank's experts. Keep both exchanges in the graph (every rank's
        # backward must run both all-to-alls, or the ranks' collectives fall out of step) and
        # give the experts zero gradients, as the single-process layer does.
        unused = sum(p.sum() for p in experts.parameters()) * 0
        out = arrived[:0] + unused
    out = torch.empty_like(out).index_copy(0, by_expert, out)  # back to arrival order
    returned = exchange(out, receive, send, group)
    dropped_rows = returned.new_zeros(expert_index.numel() - kept, returned.shape[1])
    return combine(torch.cat([returned, dropped_rows]), choices, gates)


def gather_blocks(local: Tensor, shard: ExpertShard) -> Tensor:
    """Every rank's block of an expert tensor, concatenated along dim 0 (a collective)."""
    blocks = [torch.empty_like(local) for _ in range(shard.world_size)]
    dist.all_gather(blocks, local.detach().contiguous(), group=shard.group)
    return torch.cat(blocks)


def shard_experts(experts: Experts, rank: int, world_size: int, group=None) -> None:
    """Keep this rank's block of experts (``E / world_size`` of them) as the parameters, and
    make state dicts hold the full set (gathered on save, sliced on load)."""
    total = experts.num_experts
    if total % world_size:
        raise ValueError(
            f"expert parallelism needs num_experts ({total}) divisible by the number of "
            f"processes ({world_size})"
        )
    shard = ExpertShard(rank, world_size, group)
    for name in EXPERT_WEIGHTS:
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(shard.block(full.detach()).clone()))
    experts.num_local_experts = total // world_size
    experts.parallel = shard
    experts.register_state_dict_post_hook(_gather_full_experts)
    experts.register_load_state_dict_pre_hook(_take_local_experts)


def _gather_full_experts(experts: Experts, state: dict, prefix: str, local_metadata) -> None:
    """State dict hook: the full ``[E, ...]`` weights from every rank (a collective)."""
    for name in EXPERT_WEIGHTS:
        if prefix + name in state:
            state[prefix + name] = gather_blocks(state[prefix + name], experts.parallel)


def _take_local_experts(experts: Experts, state: dict, prefix: str, *args) -> None:
    """Load hook: a full ``[E, ...]`` weight becomes this rank's block."""
    shard = experts.parallel
    for name in EXPERT_WEIGHTS:
        key = prefix + name
        if key in state and state[key].shape[0] == experts.num_experts:
            state[key] = shard.block(state[key])
