"""``build_model``: the one place a model is made from its config, whoever asks (the
LightningModule, ``create_model``, ``create_model_and_transforms``, ``limoe-export``). It checks
that the tower's shape can exist, instantiates the ``_target_``, starts a LIMoE from a dense
checkpoint where the config names one (``upcycle_from``) and loads trained weights where given.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

from hydra.utils import instantiate
from safetensors.torch import load_model
from torch import Tensor, nn

from limoe.checkpoint import model_weights, read_checkpoint
from limoe.config import MOVED_MOE_KEYS
from limoe.models.upcycle import pop_upcycle, upcycle
from limoe.moe import ROUTERS

# Where each shape argument of the model config comes from in conf/: size/ (every arm
# reads the same tower size) or data/ (what the images and captions are).
SOURCE_KEY = {
    "width": "size.width",
    "num_heads": "size.num_heads",
    "depth": "size.depth",
    "embed_dim": "size.embed_dim",
    "patch_size": "size.patch_size",
    "image_size": "data.image_size",
    "context_length": "data.context_length",
}


def _key(name: str, value: object) -> str:
    """``model.width=30 (size.width)``: the model's key and the one the configs set it from."""
    source = SOURCE_KEY.get(name)
    return f"model.{name}={value}" + (f" ({source})" if source else "")


def check_tower(cfg: Mapping) -> None:
    """One line naming the key, for a tower shape no model can take (timm and open_clip stop
    with an assertion deep inside instead): sizes below 1, a width that the heads do not
    divide, an image the patches do not tile, a width the 2-D sin-cos position embedding cannot split into four parts."""
    for name in SOURCE_KEY:
        value = cfg.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"{_key(name, value)} must be at least 1")
    width, heads = cfg.get("width"), cfg.get("num_heads")
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise ValueError(
            f"{_key('width', width)} must be a multiple of {_key('num_heads', heads)}: "
            "each attention head takes an equal part of the width"
        )
    size, patch = cfg.get("image_size"), cfg.get("patch_size")
    if isinstance(size, int) and isinstance(patch, int) and size % patch:
        raise ValueError(
            f"{_key('image_size', size)} must be a multiple of {_key('patch_size', patch)}: "
            "the image is cut into whole patches"
        )
    if cfg.get("image_pos_embed") == "sincos" and isinstance(width, int) and width % 4:
        raise ValueError(
            f"{_key('width', width)} must be a multiple of 4 for the 2-D sin-cos position "
            "embedding (model.image_pos_embed=sincos; or set it to learned)"
        )


def upgrade_moe(moe: Mapping) -> dict:
    """A ``model.moe`` node stored before the router, experts and losses had nodes of their
    own (flat keys, ``router`` a name: checkpoints and exports of earlier versions), in
    today's form; a node in today's form comes back as it is."""
    moe = dict(moe)
    if not isinstance(moe.get("router"), str) and not set(moe) & set(MOVED_MOE_KEYS):
        return moe
    router = ROUTERS[moe.pop("router", "topk")]
    options = set(inspect.signature(router.__init__).parameters) - {"self", "dim", "num_experts"}
    parts = {
        "router": {"_target_": f"limoe.moe.{router.__name__}", "_partial_": True},
        "experts": {"_target_": "limoe.moe.Experts", "_partial_": True},
        "losses": {"_target_": "limoe.moe.RouterLosses"},
    }
    for old, new in MOVED_MOE_KEYS.items():
        part, key = new.split(".")
        if old in moe and (part != "router" or key in options):
            parts[part][key] = moe.pop(old)
        moe.pop(old, None)
    return {**moe, **parts}


# ``model.compile``: read here, never passed to the model. True compiles the model's forward
# with ``torch.compile`` (``nn.Module.compile``, in place) once the weights are in.
COMPILE_KEY = "compile"


def build_model(
    cfg: Mapping, weights: Mapping[str, Tensor] | str | Path | None = None, **kwargs
) -> nn.Module:
    """The model of ``cfg`` (a ``_target_`` and its arguments; ``kwargs`` override them).

    ``weights``: a state dict, or the path of a ``model.safetensors``; loaded strictly. Without
    them, a config with ``upcycle_from`` starts from that dense checkpoint (``upcycle``). With
    ``compile`` true the forward is compiled (``torch.compile``).
    """
    if "_target_" not in cfg:
        raise ValueError(f"a model config needs a _target_, got keys {sorted(cfg)}")
    cfg, upcycle_from = pop_upcycle({**cfg, **kwargs})
    compiled = cfg.pop(COMPILE_KEY, False)
    if isinstance(cfg.get("moe"), Mapping):
        cfg["moe"] = upgrade_moe(cfg["moe"])
    check_tower(cfg)
    model = instantiate(cfg, _convert_="all")
    if isinstance(weights, str | Path):
        load_model(model, str(weights), strict=True)
    elif weights is not None:
        model.load_state_dict(weights, strict=True)
    elif upcycle_from:
        upcycle(model, model_weights(read_checkpoint(upcycle_from, "model.upcycle_from")))
    if compiled:
        model.compile()  # in place: the state dict keeps its keys
    return model
