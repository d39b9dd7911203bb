"""What each model config costs per image-text pair: parameters (total and active per token)
and forward FLOPs counted by ``FlopCounterMode`` on one pair, with the ratio to the model it
is compared against (LIMoE-B/32 against CLIP ViT-B/32, ...).

The pair is a random image and a caption that fills the context (every text position real),
so the count is the most a pair can cost and does not depend on caption length. MoE layers
are counted dropless (``capacity_factor=null``): every token reaches its expert, which is
the compute a layer of capacity factor 1.0 reserves; on one pair an untrained router at 1.0
would drop many tokens and look cheaper than the layer is.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from limoe.models import model_cost

from .gpu import synthetic_pairs


def full_caption(batch: int, context_length: int, vocab_size: int) -> torch.Tensor:
    """Token rows with every position a real token (start, words, end-of-text last)."""
    tokens = torch.full((batch, context_length), 320, dtype=torch.long)  # any word id
    tokens[:, 0], tokens[:, -1] = vocab_size - 2, vocab_size - 1
    return tokens


def run_cost_bench(
    against: Mapping[str, str],
    compose: Callable[[list[str]], DictConfig],
    build: Callable[[DictConfig], torch.nn.Module],
    overrides: Sequence[str] = (),
    dropless: bool = True,
    progress: bool = True,
) -> list[dict]:
    """One row per model of ``against`` (keys and values, each once): parameters, forward FLOPs
    per pair and, for the keys, the FLOPs as a fraction of their value's (``compose`` gives
    a model's run config from overrides, ``build`` the model from it)."""
    names = list(dict.fromkeys([*against, *against.values()]))
    found = {}
    for name in tqdm(names, desc="limoe-bench cost", disable=not progress):
        cfg = compose([f"model={name}", *overrides])
        if dropless and cfg.model.get("moe_layers"):
            cfg = compose([f"model={name}", *overrides, "model.moe.capacity_factor=null"])
        torch.manual_seed(0)
        model = build(cfg)
        size, context = cfg.data.image_size, cfg.data.context_length
        images, _ = synthetic_pairs(1, size, context)
        tokens = full_caption(1, context, cfg.model.get("vocab_size", 49408))
        cost = model_cost(model, images, tokens)
        found[name] = {"model": name, "image_size": size, "context_length": context,
                       "params_total": cost["model/params_total"],
                       "params_active_per_token": cost["model/params_active_per_token"],
                       "flops_per_pair": cost["model/flops_per_pair"]}  # fmt: skip
        del model
        gc.collect()
    for name, row in found.items():
        base = against.get(name)
        row["against"] = base
        row["flops_vs_against"] = (
            None if base is None else row["flops_per_pair"] / found[base]["flops_per_pair"]
        )
    return list(found.values())
