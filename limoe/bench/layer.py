"""MoE layer benchmark: a dense timm ``Mlp`` of the expert's size, the sorted MoE dispatch
and GShard's one-hot reference, on the same tokens, forward and forward+backward.

Every MoE case is timed next to its own dense MLP (interleaved repeats, same run), so the
ratios ``time_vs_dense`` compare like with like on whatever the machine is doing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from statistics import median

import torch
from timm.layers import Mlp
from torch import Tensor, nn
from tqdm.auto import tqdm

from limoe.moe import Experts, MoELayer, RouterLosses, TopKRouter

from .timing import time_interleaved

MODES = ("dense", "sorted", "onehot")
PASSES = ("fwd", "fwd_bwd")


@dataclass(frozen=True)
class LayerCase:
    """One point of the grid: the MoE shape and the token set it is run on."""

    num_experts: int
    top_k: int
    capacity_factor: float | None  # None = dropless
    tokens: int
    dim: int
    hidden: int


def layer_cases(
    num_experts: Sequence[int],
    top_k: Sequence[int],
    capacity_factor: Sequence[float | None],
    tokens: Sequence[int],
    dim: Sequence[int],
    mlp_ratio: float = 4.0,
) -> list[LayerCase]:
    """The grid's cases, leaving out top_k > num_experts (top-2 of one expert)."""
    grid = itertools.product(dim, tokens, num_experts, top_k, capacity_factor)
    return [LayerCase(e, k, cf, n, d, int(d * mlp_ratio)) for d, n, e, k, cf in grid if k <= e]


def build_layer(case: LayerCase, mode: str, moe: Mapping | None = None) -> nn.Module:
    """``dense``: timm ``Mlp(dim, hidden)``; ``sorted`` / ``onehot``: ``MoELayer`` with that
    dispatch, a top-k router, ``moe``'s ``router``, ``experts`` and ``losses`` options (as the
    model config's ``model.moe`` nodes) and the losses' defaults, which are part of its cost."""
    if mode == "dense":
        return Mlp(case.dim, case.hidden)
    if mode not in MODES:
        raise ValueError(f"layer mode must be one of {MODES}, got {mode!r}")
    moe = moe or {}
    losses = dict(moe.get("losses", {}))
    if case.num_experts == 1:  # one expert cannot spread over S = 2: no global entropy loss
        losses["global_entropy_weight"] = 0.0
    router = TopKRouter(case.dim, case.num_experts, top_k=case.top_k, **moe.get("router", {}))
    experts = Experts(case.num_experts, case.dim, case.hidden, **moe.get("experts", {}))
    return MoELayer(router, experts, RouterLosses(**losses), case.capacity_factor, dispatch=mode)


def _forward(module: nn.Module, x: Tensor, modality: Tensor) -> tuple[Tensor, Tensor | float]:
    if isinstance(module, MoELayer):
        y, routing = module(x, modality)
        return y, routing.aux_loss
    return module(x), 0.0


def layer_call(
    module: nn.Module, x: Tensor, modality: Tensor, probe: Tensor, backward: bool,
    dtype: torch.dtype,
) -> Callable[[], None]:  # fmt: skip
    """One timed call: forward alone (under ``no_grad``, as in inference), or forward then
    backward of ``<y, probe> + aux_loss`` into the input and every parameter. A non-float32
    ``dtype`` runs under autocast, as mixed-precision training does."""
    device = x.device.type

    def run() -> None:
        amp = torch.autocast(device, dtype) if dtype != torch.float32 else nullcontext()
        if not backward:
            with torch.no_grad(), amp:
                _forward(module, x, modality)
            return
        module.zero_grad(set_to_none=True)
        x_in = x.detach().requires_grad_(True)
        with amp:
            y, aux = _forward(module, x_in, modality)
        ((y.float() * probe).sum() + aux).backward()

    return run


def _inputs(case: LayerCase, image_fraction: float, device: torch.device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(case.tokens, case.dim, generator=generator).to(device)
    probe = torch.randn(case.tokens, case.dim, generator=generator).to(device)
    modality = torch.ones(case.tokens, dtype=torch.long)
    modality[: int(round(image_fraction * case.tokens))] = 0  # 0 = image, 1 = text
    return x, modality.to(device), probe


def _dropped_fraction(module: nn.Module, x: Tensor, modality: Tensor) -> float | None:
    if not isinstance(module, MoELayer):
        return None
    with torch.no_grad():
        return module(x, modality)[1].dropped.float().mean().item()


def run_layer_bench(
    cases: Sequence[LayerCase],
    modes: Sequence[str] = MODES,
    passes: Sequence[str] = PASSES,
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    moe: Mapping | None = None,
    image_fraction: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    compile: bool = False,
) -> list[dict]:
    """One row per (case, mode, pass): median seconds, every repeat, tokens/s, the ratio to
    the dense MLP's time in the same case and pass, and the share of dropped choices. With
    ``compile`` every module is compiled (``nn.Module.compile``) before it is timed."""
    unknown = set(passes) - set(PASSES)
    if unknown:
        raise ValueError(f"layer passes must be among {PASSES}, got {sorted(unknown)}")
    device = torch.device(device)
    rows = []
    for case in tqdm(cases, desc="limoe-bench layer", disable=not progress):
        torch.manual_seed(seed)
        modules = {mode: build_layer(case, mode, moe).to(device) for mode in modes}
        for module in modules.values() if compile else ():
            module.compile()
        x, modality, probe = _inputs(case, image_fraction, device, seed)
        dropped = {mode: _dropped_fraction(m, x, modality) for mode, m in modules.items()}
        for pass_name in passes:
            calls = {
                mode: layer_call(m, x, modality, probe, pass_name == "fwd_bwd", dtype)
                for mode, m in modules.items()
            }
            times = time_interleaved(calls, warmup, repeats, device)
            dense = median(times["dense"]) if "dense" in times else None
            for mode in modules:
                seconds = median(times[mode])
                rows.append({
                    **asdict(case), "mode": mode, "pass": pass_name, "median_s": seconds,
                    "times_s": times[mode], "tokens_per_s": case.tokens / seconds,
                    "time_vs_dense": None if dense is None else seconds / dense,
                    "dropped_fraction": dropped[mode],
                })  # fmt: skip
    return rows
