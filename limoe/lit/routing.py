"""Per-(layer, expert, modality) routing statistics from the MoE layers' routing records."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from limoe.moe import Routing

MODALITY_NAMES = ("image", "text")


def expert_counts(routing: Routing, num_modalities: int = 2) -> Tensor:
    """Kept (not dropped) expert assignments, as a [num_experts, num_modalities] count."""
    num_experts = routing.probs.shape[1]
    modality = routing.modality
    if modality is None:
        modality = torch.zeros(routing.expert_index.shape[0], dtype=torch.long)
    modality = modality.to(routing.expert_index.device)
    kept = ~routing.dropped
    flat = routing.expert_index * num_modalities + modality.unsqueeze(1)
    counts = torch.bincount(flat[kept], minlength=num_experts * num_modalities)
    return counts.view(num_experts, num_modalities)


def modality_tokens(routing: Routing, num_modalities: int = 2) -> Tensor:
    """Number of tokens of each modality in the routed set."""
    if routing.modality is None:
        return torch.tensor([routing.expert_index.shape[0]] + [0] * (num_modalities - 1))
    return torch.bincount(routing.modality, minlength=num_modalities)


def routing_stats(
    routings: Sequence[Routing], layers: Sequence[int], names: Sequence[str] = MODALITY_NAMES
) -> dict[str, Tensor]:
    """Flat, loggable statistics: each expert's share of a modality's tokens per layer, the
    fraction of each modality's choices dropped, and the raw auxiliary losses (layer mean).

    ``routing/layer{l}/expert{e}/{modality}``: the fraction of that modality's tokens the
    expert processed (kept choices over tokens x top_k; the shares of a layer sum to one minus
    the dropped fraction).
    """
    stats: dict[str, Tensor] = {}
    dropped = {name: [] for name in names}
    aux: dict[str, list[Tensor]] = {}
    for layer, routing in zip(layers, routings):
        top_k = routing.expert_index.shape[1]
        denom = (modality_tokens(routing, len(names)) * top_k).clamp(min=1).float()
        share = expert_counts(routing, len(names)).float() / denom.to(routing.probs.device)
        for e in range(share.shape[0]):
            for m, name in enumerate(names):
                stats[f"routing/layer{layer}/expert{e}/{name}"] = share[e, m]
        for m, name in enumerate(names):
            dropped[name].append(1.0 - share[:, m].sum())
        for key, value in routing.aux_losses.items():
            aux.setdefault(key, []).append(value.detach())
    for name, values in dropped.items():
        if values:
            stats[f"dropped/{name}"] = torch.stack(values).mean()
    for key, values in aux.items():
        stats[f"aux/{key}"] = torch.stack(values).mean()
    return stats
