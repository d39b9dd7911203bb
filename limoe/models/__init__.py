"""Models: the one-tower LIMoE encoder (dense when it has no MoE blocks) and the factory."""

from limoe.models.factory import create_model
from limoe.models.limoe import LIMoE, text_padding_mask

__all__ = ["LIMoE", "create_model", "text_padding_mask"]
