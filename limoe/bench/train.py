"""Training-step throughput: pairs/s of forward, loss, backward and an AdamW step, for each
model on the same batch, timed interleaved so the ratios to the dense tower are fair."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from statistics import median

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .timing import time_interleaved


def make_step(
    module: nn.Module, dtype: torch.dtype, lr: float = 1e-3
) -> Callable[[Tensor, Tensor], Tensor]:
    """``step(images, tokens) -> loss``: one optimisation step of ``module`` (anything with
    ``compute_loss(images, tokens)``, such as ``ContrastiveModule``), under autocast when
    ``dtype`` is not float32; the loss comes back detached, on the device (no sync). The
    optimiser is the one training builds (``build_optimizer``) where the module has one."""
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
        return loss.detach()

    return step


def training_step(
    module: nn.Module, images: Tensor, tokens: Tensor, dtype: torch.dtype, lr: float = 1e-3
) -> Callable[[], Tensor]:
    """``make_step`` on one fixed batch."""
    step = make_step(module, dtype, lr)
    return lambda: step(images, tokens)


def run_train_bench(
    modules: Mapping[str, nn.Module],
    images: Tensor,
    tokens: Tensor,
    warmup: int = 3,
    repeats: int = 10,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> list[dict]:
    """One row per model: median step seconds, every repeat, pairs/s, and pairs/s as a
    fraction of the ``dense`` model's (when it is among the models): the median over rounds
    of the dense step's time over the model's in the same round (``round_ratios``), so a
    slow spell of the machine that spans a round cancels out of the ratio."""
    device = images.device
    for module in modules.values():
        module.to(device).train()
    calls = {name: training_step(m, images, tokens, dtype) for name, m in modules.items()}
    rounds = warmup + repeats
    with tqdm(total=rounds, desc="limoe-bench train", unit="round", disable=not progress) as bar:
        times = time_interleaved(calls, warmup, repeats, device, on_round=bar.update)
    batch = images.shape[0]
    rate = {name: batch / median(t) for name, t in times.items()}
    return [
        {
            "model": name,
            "batch_size": batch,
            "median_s": median(times[name]),
            "times_s": times[name],
            "pairs_per_s": rate[name],
            "pairs_per_s_vs_dense": (
                median(round_ratios(times["dense"], times[name])) if "dense" in times else None
            ),
            "params": sum(p.numel() for p in module.parameters()),
        }  # fmt: skip
        for name, module in modules.items()
    ]


def round_ratios(reference_s: list[float], model_s: list[float]) -> list[float]:
    """Per round, the model's throughput as a fraction of the reference's: the reference's
    step time over the model's, both timed back to back in that round."""
    return [ref / own for ref, own in zip(reference_s, model_s, strict=True)]
