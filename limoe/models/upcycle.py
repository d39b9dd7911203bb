"""Sparse upcycling (Komatsuzaki et al., 2022): a LIMoE that starts from a trained dense
one-tower model of the same size. Every weight outside the MoE layers is copied; every expert
of a MoE layer starts as a copy of that block's dense MLP; the routers start fresh.

A token's update is ``sum_k gate_k * expert_k(x)``. Upcycling needs gates that sum to 1
(``model.moe.router.renormalize_gates=true``): with copied experts the update is then the dense
MLP's whatever the gates are, at the start and at any router sharpness, so nothing can scale
an expert's output past its dense MLP's. (Plain softmax gates sum to between 1/E and 1, so a
start equal to the dense model would need experts scaled by E / k, and any gate that grew
above 1/E would then multiply the dense MLP's output, up to E / k times; at E=32 that is 32.)
A renormalised top-1 gate is exactly 1 and still passes the router its gradient
(``limoe.moe.routing.route``); top-k > 1 gates pass it once the experts differ.

The routers start from weights so small (logits of about ``ROUTER_LOGIT_STD``) that every
token's probabilities are near uniform, so routing starts unbiased, while the tiny logits
still differ between tokens, so tokens spread over the experts rather than all tying onto the
first. Where a capacity factor is set, tokens over an expert's capacity are dropped (their MLP
update is skipped), so there the start equals the dense model only when nothing is dropped;
dropless layers (the default ``model=limoe``) always match.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from limoe.models.limoe import LIMoE
from limoe.moe import TopKRouter

# The key of the model config naming the dense checkpoint; it is not a model argument.
UPCYCLE_KEY = "upcycle_from"
# Standard deviation of the upcycled routers' logits: gates equal 1/E to about this relative
# error, while fp32 probabilities of ~1/E still differ between experts (ulp ~ 1e-7 relative).
ROUTER_LOGIT_STD = 1e-6


def pop_upcycle(model_cfg: Mapping) -> tuple[dict, str | None]:
    """``(model config without upcycle_from, its value)``: the models take no such argument."""
    cfg = dict(model_cfg)
    return cfg, cfg.pop(UPCYCLE_KEY, None)


def upcycle(model: LIMoE, dense: Mapping[str, Tensor], generator: torch.Generator | None = None):
    """Load the dense one-tower weights ``dense`` (a state dict with the same config but no MoE
    layers) into ``model``, as the module docstring describes; returns ``model``."""
    if not isinstance(model, LIMoE):
        raise ValueError(
            f"model.upcycle_from needs a one-tower LIMoE model, not {type(model).__name__}"
        )
    ours = model.state_dict()
    state = {}
    for i in model.moe_layers:
        state.update(_upcycled_layer(model.blocks[i].mlp, dense, f"blocks.{i}.mlp.", generator))
    state.update({k: v for k, v in dense.items() if not _in_moe_layer(k, model.moe_layers)})
    _check_same_weights(state, ours)
    model.load_state_dict(state, strict=True)
    return model


def _in_moe_layer(name: str, moe_layers: list[int]) -> bool:
    return any(name.startswith(f"blocks.{i}.mlp.") for i in moe_layers)


def _upcycled_layer(layer, dense: Mapping[str, Tensor], prefix: str, generator) -> dict:
    if type(layer.router) is not TopKRouter:
        raise ValueError(f"model.upcycle_from needs router@model.moe.router=topk (its gates "
                         f"are known at the start), got {layer.router.name!r}")  # fmt: skip
    if not layer.router.renormalize_gates:
        raise ValueError("model.upcycle_from needs model.moe.router.renormalize_gates=true: "
                         "gates that sum to 1 keep the copied experts at the dense MLP's "
                         "output")  # fmt: skip
    names = [f"{prefix}{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    missing = [n for n in names if n not in dense]
    if missing:
        raise ValueError(f"model.upcycle_from is not a dense one-tower checkpoint of this size: "
                         f"it has no {missing[0]} (upcycle from model=dense or dense_*)")  # fmt: skip
    fc1_w, fc1_b, fc2_w, fc2_b = (dense[n].float() for n in names)
    experts = layer.num_experts
    router = layer.router.weight
    logit_std = ROUTER_LOGIT_STD * router.shape[1] ** -0.5  # LayerNorm output: |x| ~ sqrt(dim)
    noise = torch.randn(router.shape, generator=generator) * logit_std
    # Expanded views: load_state_dict copies each into the experts' own storage.
    return {
        f"{prefix}router.weight": noise,
        # a bias-balanced router's bias and counts start at zero, as in a fresh model
        **{f"{prefix}router.{name}": buf for name, buf in layer.router.named_buffers()},
        f"{prefix}experts.w1": fc1_w.t().expand(experts, -1, -1),
        f"{prefix}experts.b1": fc1_b.expand(experts, -1),
        f"{prefix}experts.w2": fc2_w.t().expand(experts, -1, -1),
        f"{prefix}experts.b2": fc2_b.expand(experts, -1),
    }


def _check_same_weights(state: Mapping[str, Tensor], ours: Mapping[str, Tensor]) -> None:
    """One line naming the first weight the dense checkpoint lacks, has in excess, or holds
    in another shape than the upcycled model."""
    missing = sorted(set(ours) - set(state))
    extra = sorted(set(state) - set(ours))
    shaped = [n for n in ours if n in state and state[n].shape != ours[n].shape]
    if missing or extra or shaped:
        what = (
            f"lacks {missing[0]}" if missing
            else f"has {extra[0]}, which this model lacks" if extra
            else f"holds {shaped[0]} as {list(state[shaped[0]].shape)}, this model as "
            f"{list(ours[shaped[0]].shape)}"
        )  # fmt: skip
        raise ValueError(f"model.upcycle_from does not fit this model: the checkpoint {what}; "
                         "upcycle from the dense one-tower of the same size")  # fmt: skip
