"""Helpers shared by the MoE tests: a bare layer, one expert by hand, distinct experts with a
decisive router, and a forward/backward that returns every gradient."""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F

from limoe.moe import ROUTERS, Experts, MoELayer, RouterLosses, SoftRouter, TopKRouter

# The routing mechanics alone, without what LIMoE's defaults add on top: a capacity (factor
# 1.0, so drops happen), no router noise, no auxiliary losses. A test sets what it examines.
BARE = {
    "capacity_factor": 1.0,
    "noisy_gating": False,
    "importance_weight": 0.0,
    "load_weight": 0.0,
    "vmoe_load_weight": 0.0,
    "local_entropy_weight": 0.0,
    "global_entropy_weight": 0.0,
    "global_entropy_min_experts": 1.0,
}
LOSS_OPTIONS = {f.name for f in fields(RouterLosses)}
EXPERT_OPTIONS = {"act_layer", "drop", "gemm"}
TOPK_OPTIONS = {"top_k", "batch_priority", "renormalize_gates", "noisy_gating",
                "capacity_multiple", "init_std"}  # fmt: skip


def make_layer(
    dim: int, hidden: int, num_experts: int = 16, router: str = "topk", **options
) -> MoELayer:
    """A ``MoELayer`` of its parts from one flat set of options, the tests' shorthand: the
    router's (by name, ``ROUTERS``), the experts', the losses' and the layer's own."""
    parts = {"router": {}, "experts": {}, "losses": {}, "layer": {}}
    for key, value in options.items():
        part = ("losses" if key in LOSS_OPTIONS else "experts" if key in EXPERT_OPTIONS
                else "router" if key in TOPK_OPTIONS | {"slots_per_expert"} else "layer")  # fmt: skip
        parts[part][key] = value
    cls = ROUTERS[router]
    if not issubclass(cls, TopKRouter):  # options a top-k router has and this one has not
        parts["router"] = {k: v for k, v in parts["router"].items() if k not in TOPK_OPTIONS}
    return MoELayer(
        cls(dim, num_experts, **parts["router"]),
        Experts(num_experts, dim, hidden, **parts["experts"]),
        RouterLosses(**parts["losses"]),
        **parts["layer"],
    )


def bare_layer(*args, **kwargs) -> MoELayer:
    """``make_layer(*args, **kwargs)`` with ``BARE`` under the given keywords."""
    return make_layer(*args, **{**BARE, **kwargs})


def expert_mlp(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of ``layer`` applied to ``x`` by hand (fc1 -> GELU -> fc2)."""
    ex = layer.experts
    return F.gelu(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]


def randomise(layer: MoELayer) -> MoELayer:
    """Distinct experts and a router that decides (the init's are near-identical/uniform)."""
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(std=0.3)
        if hasattr(layer.router, "weight"):  # router="modality" learns nothing
            layer.router.weight.normal_(std=1.0)
        if isinstance(layer.router, SoftRouter):  # unit-norm logits: sharpen them as training would
            layer.router.scale.fill_(4.0)
    return layer


def outputs_and_grads(layer: MoELayer, x: torch.Tensor, mode: str, probe: torch.Tensor):
    """Forward in dispatch ``mode``, backward of <y, probe>: output and every gradient."""
    layer.path = mode
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y, routing = layer(x)
    (y * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, routing
