"""Lightning: the contrastive training module and its callbacks (routing history, exact
resume, expert parallelism)."""

from limoe.lit.callbacks import RoutingHistory, read_history
from limoe.lit.module import ContrastiveModule, NonFiniteLossError
from limoe.lit.parallel import ExpertParallel
from limoe.lit.resume import ExactResume

__all__ = [
    "ContrastiveModule",
    "ExactResume",
    "ExpertParallel",
    "NonFiniteLossError",
    "RoutingHistory",
    "read_history",
]
