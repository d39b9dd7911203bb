"""Helpers shared by the MoE tests: a bare layer, one expert by hand, distinct experts with a
decisive router, and a forward/backward that returns every gradient."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from limoe.moe import ROUTERS, Experts, MoELayer, RouterLosses, SoftRouter

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


def _options(cls: type) -> set[str]:
    return set(inspect.signature(cls).parameters)


# Every router's options: a router is given those it takes (BARE's noisy_gating is top-k's).
ROUTER_OPTIONS = set().union(*(_options(cls) for cls in ROUTERS.values())) - {"dim", "num_experts"}


def make_layer(
    dim: int, hidden: int, num_experts: int = 16, router: str = "topk", **options
) -> MoELayer:
    """A ``MoELayer`` of its parts from one flat set of options, the tests' shorthand: each
    part (the router, by name in ``ROUTERS``; the experts; the losses) takes the options its
    constructor names, the layer the rest."""
    cls = ROUTERS[router]

    def take(names: set[str]) -> dict:
        return {k: options.pop(k) for k in list(options) if k in names}

    router_options = {k: v for k, v in take(ROUTER_OPTIONS).items() if k in _options(cls)}
    experts = Experts(num_experts, dim, hidden, **take(_options(Experts)))
    losses = RouterLosses(**take(_options(RouterLosses)))
    return MoELayer(cls(dim, num_experts, **router_options), experts, losses, **options)


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
