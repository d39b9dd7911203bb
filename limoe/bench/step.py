"""A plain optimisation step (forward, CLIP and auxiliary losses, backward, AdamW), without
Lightning's loop: what the file-feed and GPU suites repeat, where the loop around it is the
same for every case compared. ``limoe.bench.train`` times steps as ``limoe-train`` runs them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from limoe.moe.balance import update_expert_bias


def make_step(
    module: nn.Module, dtype: torch.dtype, lr: float = 1e-3
) -> Callable[[Tensor, Tensor], Tensor]:
    """``step(images, tokens) -> loss``: one optimisation step of ``module`` (anything with
    ``compute_loss(images, tokens)``, such as ``ContrastiveModule``), under autocast when
    ``dtype`` is not float32; the loss comes back detached, on the device (no sync). The
    optimiser is the one training builds (``build_optimizer``) where the module has one;
    bias-balanced routers update their bias after it, as in training."""
    if hasattr(module, "build_optimizer"):
        optimizer = module.build_optimizer()
    else:
        optimizer = torch.optim.AdamW(module.parameters(), lr=lr)

    def step(images: Tensor, tokens: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        amp = torch.autocast(images.device.type, dtype) if dtype != torch.float32 else nullcontext()
        with amp:
            loss = module.compute_loss(images, tokens)[0]
        loss.backward()
        optimizer.step()
        update_expert_bias(module)  # bias-balanced routers, as training does
        return loss.detach()

    return step


def training_step(
    module: nn.Module, images: Tensor, tokens: Tensor, dtype: torch.dtype, lr: float = 1e-3
) -> Callable[[], Tensor]:
    """``make_step`` on one fixed batch."""
    step = make_step(module, dtype, lr)
    return lambda: step(images, tokens)
