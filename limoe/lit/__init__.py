"""Lightning: the contrastive training module, callbacks and routing statistics."""

from limoe.lit.callbacks import RoutingHistory, read_history
from limoe.lit.module import ContrastiveModule, NonFiniteLossError
from limoe.lit.routing import concat_routings, expert_counts, layer_summary, routing_stats

__all__ = [
    "ContrastiveModule",
    "NonFiniteLossError",
    "RoutingHistory",
    "concat_routings",
    "expert_counts",
    "layer_summary",
    "read_history",
    "routing_stats",
]
