"""The CLIP baseline arm: open_clip's own two-tower ``CLIP``, sized by the shared size node.

``conf/model/clip.yaml`` reads width, depth, heads, patch size, embedding dimension and
vocabulary from ``size`` (as ``model=limoe`` and ``model=dense`` do), so ``size.width=128``
changes all three arms alike. This function only translates those keys into open_clip's
``vision_cfg``/``text_cfg``; the towers, pooling, initialisation and temperature are
open_clip's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import open_clip
from open_clip.model import CLIP

from limoe.models.clip_moe import CLIPMoE

_POS_EMBED = {"sincos": "sin_cos_2d", "learned": "learnable"}
_IMAGE_POOL = {"mean": "avg", "tok": "tok", "attn": "tok"}  # attn: open_clip's attention pooler
_TEXT_POOL = {"eot": "argmax", "last": "last", "first": "first"}


def _choice(key: str, value: str, table: dict[str, str]) -> str:
    if value not in table:
        raise ValueError(f"model.{key}={value!r} is not available for model=clip; "
                         f"choose one of {', '.join(table)}")  # fmt: skip
    return table[value]


def build_clip(
    embed_dim: int = 96,
    image_size: int = 56,
    patch_size: int = 8,
    width: int = 96,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    context_length: int = 16,
    vocab_size: int = 49408,
    image_pos_embed: str = "sincos",
    image_pool: str = "mean",
    text_pool: str = "eot",
    text_causal_mask: bool = True,
    init_logit_scale: float = math.log(1 / 0.07),
    init_logit_bias: float | None = None,
    output_dict: bool = True,
    moe_layers: Sequence[int] = (),
    moe: dict | None = None,
) -> CLIP:
    """Build ``open_clip.model.CLIP`` with both towers ``depth`` blocks of ``width``; with
    ``moe_layers``, a ``CLIPMoE`` whose image blocks of those indices have a MoE MLP (``moe``:
    the ``model.moe`` node; ``model=clip_moe``).

    open_clip's text tower has no mean pooling: the arm pools the end-of-text token
    (``argmax`` of the token ids) behind a causal mask, as CLIP does. The tower's shape is
    checked by the factory (``check_tower``) before this runs.
    """
    vision_cfg = {
        "image_size": image_size,
        "patch_size": patch_size,
        "layers": depth,
        "width": width,
        "head_width": width // num_heads,
        "mlp_ratio": mlp_ratio,
        "pos_embed_type": _choice("image_pos_embed", image_pos_embed, _POS_EMBED),
        "pool_type": _choice("image_pool", image_pool, _IMAGE_POOL),
        "attentional_pool": image_pool == "attn",
        "attn_pooler_queries": 1,
        "attn_pooler_heads": num_heads,
    }
    text_cfg = {
        "context_length": context_length,
        "vocab_size": vocab_size,
        "width": width,
        "heads": num_heads,
        "layers": depth,
        "mlp_ratio": mlp_ratio,
        "pool_type": _choice("text_pool", text_pool, _TEXT_POOL),
        "no_causal_mask": not text_causal_mask,
    }
    scale = {"init_logit_scale": init_logit_scale, "init_logit_bias": init_logit_bias}
    if moe_layers:
        return CLIPMoE(embed_dim, vision_cfg, text_cfg, moe_layers, moe, **scale,
                       output_dict=output_dict)  # fmt: skip
    return CLIP(embed_dim, vision_cfg, text_cfg, **scale, output_dict=output_dict)


def build_open_clip(
    name: str = "ViT-B-32",
    image_size: int | None = None,
    context_length: int | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
    output_dict: bool = True,
) -> CLIP:
    """open_clip's own model config ``name`` (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ...)
    as ``open_clip.create_model(name)`` builds it, without pretrained weights: the paper-size
    CLIP arms. ``image_size`` and ``context_length`` replace the config's (224 and 77 for
    those three) when given, so the arm reads the data's sizes as the others do; so do
    ``init_logit_scale`` and ``init_logit_bias`` (``loss=siglip`` sets both)."""
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"model.name={name!r} is not an open_clip model config; "
                         f"choose one of open_clip.list_models()")  # fmt: skip
    if image_size is not None:
        config["vision_cfg"]["image_size"] = image_size
    if context_length is not None:
        config["text_cfg"]["context_length"] = context_length
    for key, value in (
        ("init_logit_scale", init_logit_scale),
        ("init_logit_bias", init_logit_bias),
    ):
        if value is not None:
            config[key] = value
    return CLIP(**config, output_dict=output_dict)
