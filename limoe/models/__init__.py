"""Models: the one-tower LIMoE encoder (dense when it has no MoE blocks), the open_clip CLIP
arm, CLIP with experts in its image tower (``clip_moe``) and what each costs (parameters,
FLOPs). ``limoe.factory`` builds them from their configs."""

from limoe.models.clip import build_clip, build_open_clip
from limoe.models.clip_moe import CLIPMoE
from limoe.models.cost import model_cost, parameter_counts
from limoe.models.limoe import LIMoE, text_padding_mask
from limoe.models.upcycle import upcycle

__all__ = [
    "CLIPMoE",
    "LIMoE",
    "build_clip",
    "build_open_clip",
    "model_cost",
    "parameter_counts",
    "text_padding_mask",
    "upcycle",
]
