"""What routing records say, as numbers: per-(layer, expert, modality) token counts and shares,
expert kinds (image-only, text-only, shared, unused), routing entropy and gate confidence.
Training logs them (``routing_stats``), ``RoutingHistory`` and ``limoe-analyze`` summarise
them (``layer_summary``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .losses import entropy
from .routing import MODALITY_NAMES, Routing, one_hot


def expert_counts(routing: Routing, num_modalities: int = 2) -> Tensor:
    """Kept (not dropped) expert assignments of the real tokens, as a [num_experts,
    num_modalities] count; one-hot sums of fixed size (no ``bincount``, no boolean index)."""
    num_experts = routing.probs.shape[1]
    kept = ~routing.dropped
    if routing.valid is not None:  # padding is no assignment
        kept = kept & routing.valid.unsqueeze(1)
    kept = kept.float()
    experts = one_hot(routing.expert_index, num_experts) * kept.unsqueeze(-1)  # [N, k, E]
    modalities = one_hot(_modality_or_zeros(routing), num_modalities)  # [N, M]
    return torch.einsum("nke,nm->em", experts, modalities).round().long()


def modality_tokens(routing: Routing, num_modalities: int = 2) -> Tensor:
    """Number of real tokens of each modality in the routed set."""
    modalities = one_hot(_modality_or_zeros(routing), num_modalities)
    if routing.valid is not None:
        modalities = modalities * routing.valid.unsqueeze(1)
    return modalities.sum(dim=0).round().long()


def choice_totals(routing: Routing, counts: Tensor, tokens: Tensor) -> Tensor:
    """Per modality, the choices an expert's share is a share of: tokens x top_k for top-k and
    soft routing (so a layer's shares sum to one minus its dropped share); the kept choices for
    expert choice, whose E choices per token are requests that most experts turn down by
    design (its shares sum to one). ``counts`` as ``expert_counts``, ``tokens`` as
    ``modality_tokens``."""
    if routing.experts_choose:
        return counts.sum(dim=0)
    return tokens * routing.expert_index.shape[1]


def dropped_share(routing: Routing, counts: Tensor, tokens: Tensor) -> Tensor:
    """Per modality, the share dropped: of the top-k choices, those over capacity; under
    expert choice, the tokens no expert picked (they pass through on the residual alone)."""
    if routing.experts_choose:
        unpicked = routing.dropped.all(dim=1)
        if routing.valid is not None:
            unpicked = unpicked & routing.valid
        modalities = one_hot(_modality_or_zeros(routing), tokens.numel())
        lost = (modalities * unpicked.unsqueeze(1)).sum(dim=0).to(tokens.device)
        return lost / tokens.clamp(min=1).float()
    kept = counts.sum(dim=0).float()
    totals = choice_totals(routing, counts, tokens).float()
    return torch.where(tokens > 0, 1.0 - kept / totals.clamp(min=1), torch.zeros_like(kept))


def _modality_or_zeros(routing: Routing) -> Tensor:
    if routing.modality is None:
        return torch.zeros(routing.expert_index.shape[0], dtype=torch.long,
                           device=routing.expert_index.device)  # fmt: skip
    return routing.modality.to(routing.expert_index.device)


def routing_stats(
    routings: Sequence[Routing], layers: Sequence[int], names: Sequence[str] = MODALITY_NAMES
) -> dict[str, Tensor]:
    """Flat, loggable statistics: each expert's share of a modality's tokens per layer, the
    fraction of each modality's choices dropped, and the raw auxiliary losses (layer mean).

    ``routing/layer{l}/expert{e}/{modality}``: the fraction of that modality's choices the
    expert served (``choice_totals``: of tokens x top_k, the shares of a layer summing to one
    minus the dropped share; under expert choice, of the kept choices). ``dropped/{modality}``
    as ``dropped_share``.
    """
    stats: dict[str, Tensor] = {}
    dropped = {name: [] for name in names}
    aux: dict[str, list[Tensor]] = {}
    for layer, routing in zip(layers, routings):
        counts = expert_counts(routing, len(names))
        tokens = modality_tokens(routing, len(names)).to(counts.device)
        share = counts.float() / choice_totals(routing, counts, tokens).clamp(min=1).float()
        for e in range(share.shape[0]):
            for m, name in enumerate(names):
                stats[f"routing/layer{layer}/expert{e}/{name}"] = share[e, m]
        lost = dropped_share(routing, counts, tokens)
        for m, name in enumerate(names):
            dropped[name].append(lost[m])
        for key, value in routing.aux_losses.items():
            aux.setdefault(key, []).append(value.detach())
    for name, values in dropped.items():
        if values:
            stats[f"dropped/{name}"] = torch.stack(values).mean()
    for key, values in aux.items():
        stats[f"aux/{key}"] = torch.stack(values).mean()
    return stats


def concat_routings(routings: Sequence[Routing]) -> Routing:
    """One record for the tokens of several calls of the same layer (e.g. evaluation batches);
    the auxiliary losses are averaged over the calls. Give each call's ``Routing.record`` a
    ``sequence_offset`` first where the sequence ids should stay distinct."""
    if not routings:
        raise ValueError("concat_routings needs at least one routing record")
    capacities = {r.capacity for r in routings}
    routers = {r.router for r in routings}
    if len(routers) != 1:
        raise ValueError(f"cannot concatenate records of different routers: {sorted(routers)}")
    aux = {
        k: torch.stack([r.aux_losses[k] for r in routings]).mean() for k in routings[0].aux_losses
    }

    def cat(name: str) -> Tensor | None:
        parts = [getattr(r, name) for r in routings]
        return None if any(p is None for p in parts) else torch.cat(parts)

    return Routing(
        expert_index=cat("expert_index"),
        gates=cat("gates"),
        dropped=cat("dropped"),
        probs=cat("probs"),
        modality=cat("modality"),
        capacity=capacities.pop() if len(capacities) == 1 else None,
        aux_losses=aux,
        aux_loss=torch.stack([r.aux_loss for r in routings]).mean(),
        router=routers.pop(),
        experts_choose=routings[0].experts_choose,
        sequence=cat("sequence"),
        position=cat("position"),
    )


def _finite_or_none(values: Tensor) -> list[float | None]:
    return [float(v) if torch.isfinite(v) else None for v in values]


def _mean_gate(routing: Routing, rows: Tensor) -> float:
    """Mean gate of the kept choices of the tokens in ``rows`` (0 where there are none)."""
    kept = (~routing.dropped[rows]).float()
    return float((routing.gates[rows].float() * kept).sum() / kept.sum().clamp(min=1))


def expert_kinds(
    counts: Tensor, names: Sequence[str], threshold: float = 0.9, min_share: float = 0.0
) -> list[str]:
    """Each expert's kind: a modality's name when more than ``threshold`` of the tokens it
    processed are of that modality, ``"shared"`` otherwise, ``"unused"`` when it took less than
    ``min_share`` of all tokens (or none): an expert that sees a handful of image patches is
    not an image expert.

    ``counts`` is ``[num_experts, num_modalities]`` (kept assignments, as ``expert_counts``).
    """
    if not 0.5 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0.5, 1), got {threshold}")
    if not 0.0 <= min_share < 1.0:
        raise ValueError(f"min_share must be in [0, 1), got {min_share}")
    total = counts.sum(dim=1)
    kinds = []
    for e in range(counts.shape[0]):
        if total[e] == 0 or total[e] < min_share * total.sum():
            kinds.append("unused")
            continue
        fraction = counts[e].float() / total[e]
        top = int(fraction.argmax())
        kinds.append(names[top] if fraction[top] > threshold else "shared")
    return kinds


def switched_share(
    previous: Tensor, current: Tensor, modality: Tensor, names: Sequence[str] = MODALITY_NAMES
) -> dict[str, float]:
    """Per modality, the share of tokens whose first-choice expert differs between two routings
    of the same tokens (``previous`` and ``current``: ``expert_index[:, 0]``): how much routing
    still moves between two points of training (0 = settled)."""
    changed = (previous != current).float()
    return {
        name: float(changed[modality == i].mean()) if bool((modality == i).any()) else 0.0
        for i, name in enumerate(names)
    }


def layer_summary(
    routing: Routing,
    names: Sequence[str] = MODALITY_NAMES,
    threshold: float = 0.9,
    min_share: float = 0.01,
) -> dict:
    """What one MoE layer did with a set of tokens, as plain JSON-ready numbers.

    Per modality: ``tokens``; ``counts`` and ``share`` (kept choices per expert, and as a share
    of the modality's ``choice_totals``); ``dropped`` (``dropped_share``);
    ``entropy_local`` (mean entropy of a token's router distribution, nats: low = confident
    routing, what LIMoE's local loss lowers) and ``entropy_global`` (entropy of the modality's
    mean router distribution: high = many experts in use, what the global loss keeps up);
    ``top1_prob`` (mean router probability of the first choice, the router's confidence);
    ``gate`` (mean gate of the kept choices: what the chosen experts' outputs are scaled by,
    which parts from ``top1_prob`` where a bias, not the probabilities, picks the expert).
    Per expert: ``modality_fraction`` (share of its tokens from each modality; None if unused)
    and ``kind`` (see ``expert_kinds``: below ``min_share`` of the layer's tokens is "unused"),
    counted in ``specialised``.
    """
    routing = routing.real()
    m = len(names)
    modality = _modality_or_zeros(routing).to(routing.probs.device)
    top_k = routing.expert_index.shape[1]
    counts = expert_counts(routing, m).cpu()
    tokens = modality_tokens(routing, m).cpu()
    totals = choice_totals(routing, counts, tokens)
    lost = dropped_share(routing, counts, tokens)
    kinds = expert_kinds(counts, names, threshold, min_share)
    fraction = counts.float() / counts.sum(dim=1, keepdim=True)
    summary: dict = {
        "num_experts": counts.shape[0],
        "top_k": top_k,
        "tokens": {},
        "counts": {},
        "share": {},
        "dropped": {},
        "entropy_local": {},
        "entropy_global": {},
        "top1_prob": {},
        "gate": {},
        "modality_fraction": {},
        "kind": kinds,
        "specialised": {kind: kinds.count(kind) for kind in (*names, "shared", "unused")},
    }
    for i, name in enumerate(names):
        probs = routing.probs[modality == i].float()
        choices = max(int(totals[i]), 1)
        summary["tokens"][name] = int(tokens[i])
        summary["counts"][name] = counts[:, i].tolist()
        summary["share"][name] = (counts[:, i].float() / choices).tolist()
        summary["dropped"][name] = float(lost[i])
        empty = probs.shape[0] == 0
        summary["entropy_local"][name] = 0.0 if empty else float(entropy(probs).mean())
        summary["entropy_global"][name] = 0.0 if empty else float(entropy(probs.mean(0)))
        summary["top1_prob"][name] = 0.0 if empty else float(probs.amax(-1).mean())
        summary["gate"][name] = _mean_gate(routing, modality == i)
        summary["modality_fraction"][name] = _finite_or_none(fraction[:, i])
    return summary
