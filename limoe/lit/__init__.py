"""Lightning: the contrastive training module and routing statistics."""

from limoe.lit.module import ContrastiveModule
from limoe.lit.routing import expert_counts, routing_stats

__all__ = ["ContrastiveModule", "expert_counts", "routing_stats"]
