"""What a model costs: parameters (total and active per token) and forward FLOPs per pair.

The arms are compared at equal *active* compute: a top-k MoE layer holds E experts but each
token runs through k of them, so its other E - k experts count in the total only. FLOPs are
measured, not derived: ``torch.utils.flop_counter.FlopCounterMode`` counts every matmul,
convolution and attention product a real forward pass runs (2 FLOPs per multiply-add). So
the experts are charged for the tokens they keep (dropped ones cost nothing, which depends on
how trained the router is) and the one-tower model for skipping padded text tokens in its MoE
blocks, while open_clip's text tower runs every padded position.

Two fused CPU kernels are invisible to the counter: PyTorch's CPU flash attention and
``nn.MultiheadAttention``'s inference fast path. Counting therefore runs attention in the
math backend with autograd on, which runs the same products through counted matmuls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from limoe.moe import MoELayer
from limoe.moe.experts import Experts


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``params_total`` and ``params_active_per_token``: the total less, in every MoE layer,
    the experts a token does not use (``(E - top_k) / E`` of the expert weights)."""
    total = sum(p.numel() for p in model.parameters())
    unused = 0
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            here = sum(p.numel() for p in layer.experts.parameters())
            shard = layer.expert_shard  # expert parallelism: this process holds 1 / W
            expert_params = here * (shard.world_size if shard else 1)
            total += expert_params - here
            unused += expert_params * (layer.num_experts - layer.top_k) // layer.num_experts
    return {"params_total": total, "params_active_per_token": total - unused}


def count_flops(fn: Callable, *args) -> int:
    """FLOPs of one forward call ``fn(*args)`` (attention in the math backend, see above).

    Experts run as one GEMM pair per expert during the count: ``gemm=padded`` would also
    charge the padding rows of its batched GEMM, a cost of the kernel, not of the model."""
    experts = [m for m in _modules(fn) if isinstance(m, Experts)]
    modes = [e.gemm for e in experts]
    try:
        for e in experts:
            e.gemm = "loop"
        with (
            torch.enable_grad(),
            sdpa_kernel(SDPBackend.MATH),
            FlopCounterMode(display=False) as counter,
        ):
            fn(*args)
    finally:
        for e, mode in zip(experts, modes):
            e.gemm = mode
    return counter.get_total_flops()


def _modules(fn: Callable) -> list[nn.Module]:
    """The modules ``fn`` runs: itself, or the module a bound method belongs to."""
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    return list(owner.modules()) if isinstance(owner, nn.Module) else []


def flops_per_pair(model: nn.Module, images: Tensor, tokens: Tensor) -> float:
    """Forward FLOPs of ``model(images, tokens)`` divided by the number of pairs, in eval mode
    (no gating noise: the count must not draw from the training run's random stream)."""
    was_training = model.training
    model.eval()
    try:
        return count_flops(model, images, tokens) / images.shape[0]
    finally:
        model.train(was_training)


def model_cost(model: nn.Module, images: Tensor, tokens: Tensor) -> dict[str, float]:
    """Parameter counts and forward FLOPs per pair, under the keys ``metrics.json`` uses."""
    counts = parameter_counts(model)
    return {
        "model/params_total": float(counts["params_total"]),
        "model/params_active_per_token": float(counts["params_active_per_token"]),
        "model/flops_per_pair": flops_per_pair(model, images, tokens),
    }
