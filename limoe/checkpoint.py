"""Reading a limoe checkpoint, with one line for each file users mistake for one: a path that
does not exist, a file that is not a checkpoint, and a checkpoint of another model.

A limoe checkpoint is a Lightning checkpoint of ``ContrastiveModule``: its
``hyper_parameters`` hold the model, optimiser and data configs, so a mismatch is told as the
config keys that differ rather than as state-dict keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# Differences named in the message; the rest are counted.
SHOWN_DIFFERENCES = 4


class CheckpointError(ValueError):
    """The file given as a checkpoint cannot be used by this run."""


def read_checkpoint(path: str | Path, key: str = "ckpt") -> dict:
    """The checkpoint at ``path`` (tensors memory-mapped, weights-only unpickling); ``key`` is
    the config key that named it, for messages."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{key}={path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{key}={path} is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for files it cannot read
        raise CheckpointError(
            f"{key}={path} is not a limoe checkpoint: torch.load cannot read it "
            f"({type(error).__name__}); give a .ckpt file that limoe-train wrote"
        ) from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, Mapping) or "model" not in hparams or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{key}={path} is not a limoe checkpoint: it holds no model config and weights "
            "(hyper_parameters.model, state_dict); give a .ckpt file that limoe-train wrote"
        )
    return ckpt


# Weights that moved inside the model since earlier versions wrote checkpoints: the part of a
# key that changed, then and now (a block's shared expert is part of its MoE layer now).
MOVED_WEIGHTS = {".shared_mlp.": ".mlp.shared_expert."}


def model_weights(ckpt: Mapping) -> dict:
    """The model's state dict from a checkpoint's (``ContrastiveModule`` keeps it as ``model``),
    with the keys of weights that moved (``MOVED_WEIGHTS``) as the model has them now."""
    prefix = "model."
    weights = {}
    for key, value in ckpt["state_dict"].items():
        if key.startswith(prefix):
            for then, now in MOVED_WEIGHTS.items():
                key = key.replace(then, now)
            weights[key[len(prefix) :]] = value
    return weights


def check_fits(ckpt: Mapping, module: nn.Module, model: Mapping, key: str = "ckpt") -> None:
    """Stop unless the checkpoint's weights have the names and shapes of ``module``'s; the
    message names the model config keys where the checkpoint and ``model`` differ."""
    theirs = {name: tuple(t.shape) for name, t in ckpt["state_dict"].items()}
    ours = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    if theirs == ours:
        return
    differences = config_differences(ckpt["hyper_parameters"]["model"], model)
    if differences:
        shown = "; ".join(differences[:SHOWN_DIFFERENCES])
        more = len(differences) - SHOWN_DIFFERENCES
        shown += f"; and {more} more" if more > 0 else ""
        raise CheckpointError(
            f"{key} holds another model than this run's (checkpoint vs run: {shown}); "
            "compose the run with the checkpoint's model config"
        )
    mismatched = sorted(set(theirs) ^ set(ours)) or [n for n in ours if theirs[n] != ours[n]]
    raise CheckpointError(
        f"{key}'s weights do not fit this run's model, whose config is the same "
        f"({len(mismatched)} weights differ, e.g. {mismatched[0]})"
    )


def config_differences(theirs: Mapping, ours: Mapping, prefix: str = "model.") -> list[str]:
    """``model.depth: 2 vs 4`` for each key whose value differs (``absent`` where missing)."""
    a, b = _flatten(theirs, prefix), _flatten(ours, prefix)
    absent = "absent"
    return [
        f"{k}: {a.get(k, absent)} vs {b.get(k, absent)}"
        for k in sorted(set(a) | set(b))
        if a.get(k, absent) != b.get(k, absent)
    ]


def _flatten(node: Mapping, prefix: str) -> dict[str, object]:
    flat = {}
    for k, v in node.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat
