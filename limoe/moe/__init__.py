"""Sparse Mixture-of-Experts MLP (LIMoE / V-MoE style); imports nothing else of the project.

Pipeline of one ``MoELayer`` call, each step a function you can test on its own:
``route`` (logits -> probs -> top-k) -> ``compute_capacity`` / ``assign_slots``
(slot positions, drops, Batch Priority Routing) -> ``sort_by_expert`` (a stable sort, offsets
by ``searchsorted``) -> ``gather_tokens`` -> ``Experts`` (one grouped GEMM per projection, or
the ``[E, C]`` buffer at capacity) -> ``combine`` (back through the inverse permutation, a
sum over the k choices), plus the auxiliary losses in ``losses``. Every shape is known on
the host before the call (N * k rows; padding is routed and masked), so no step waits on the
device, and no step scatter-adds, so two runs are bitwise equal. ``reference`` holds GShard's one-hot einsum
dispatch, which the sorted path must equal. Each router is a class behind one interface
(``routing.Router``, returning a ``Routing``): top-k, expert choice (experts pick tokens),
Soft MoE (weighted slots, ``soft``) and the modality router (``routers``). A ``MoELayer`` is
built from a router, the ``Experts`` and the ``RouterLosses``.
``parallel`` spreads the experts over processes (expert parallelism, all-to-all);
``balance`` moves the expert biases of auxiliary-loss-free balancing once per optimiser step;
``statistics`` turns routing records into counts, shares, entropies and expert kinds.
"""

from .balance import bias_routers, update_expert_bias
from .dispatch import MatchedGather, SortedChoices, combine, gather_tokens, sort_by_expert
from .experts import Experts, ExpertShard
from .layer import MoELayer
from .losses import (
    CLASSIC_LOSSES,
    LOSS_NAMES,
    LOSS_SCOPES,
    RouterLosses,
    global_entropy_loss,
    importance_loss,
    load_loss,
    local_entropy_loss,
    vmoe_load_loss,
    z_loss,
)
from .parallel import gather_blocks, parallel_dispatch, shard_experts
from .reference import dispatch_tensors, onehot_moe
from .routers import (
    ROUTERS,
    TOPK_BALANCE_WEIGHT,
    ExpertChoiceRouter,
    ModalityRouter,
    TopKRouter,
)
from .routing import (
    MODALITY_NAMES,
    Router,
    RouterOutput,
    RouterScores,
    Routing,
    TokenOrigin,
    add_gating_noise,
    assign_slots,
    compute_capacity,
    expert_choice,
    route,
)
from .soft import SoftMixing, SoftRouter, pack_groups, soft_apply, soft_weights
from .statistics import (
    choice_totals,
    concat_routings,
    dropped_share,
    expert_counts,
    expert_kinds,
    layer_summary,
    routing_stats,
)

__all__ = [
    "CLASSIC_LOSSES",
    "LOSS_NAMES",
    "LOSS_SCOPES",
    "MODALITY_NAMES",
    "ExpertShard",
    "MatchedGather",
    "SortedChoices",
    "Experts",
    "MoELayer",
    "ROUTERS",
    "TOPK_BALANCE_WEIGHT",
    "ExpertChoiceRouter",
    "ModalityRouter",
    "Router",
    "RouterLosses",
    "RouterOutput",
    "RouterScores",
    "Routing",
    "SoftMixing",
    "TokenOrigin",
    "TopKRouter",
    "bias_routers",
    "update_expert_bias",
    "soft_apply",
    "soft_weights",
    "add_gating_noise",
    "assign_slots",
    "combine",
    "compute_capacity",
    "choice_totals",
    "concat_routings",
    "dropped_share",
    "SoftRouter",
    "expert_counts",
    "expert_kinds",
    "dispatch_tensors",
    "expert_choice",
    "gather_blocks",
    "gather_tokens",
    "global_entropy_loss",
    "importance_loss",
    "layer_summary",
    "load_loss",
    "vmoe_load_loss",
    "local_entropy_loss",
    "onehot_moe",
    "pack_groups",
    "parallel_dispatch",
    "route",
    "routing_stats",
    "shard_experts",
    "sort_by_expert",
    "z_loss",
]
