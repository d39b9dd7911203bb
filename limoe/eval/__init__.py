"""Evaluation: zero-shot classification and image-text retrieval."""

from limoe.eval.plan import ZeroShotTask
from limoe.eval.retrieval import retrieval_metrics
from limoe.eval.zeroshot import topk_accuracy, zeroshot_accuracy, zeroshot_classifier

__all__ = [
    "ZeroShotTask",
    "retrieval_metrics",
    "topk_accuracy",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]
