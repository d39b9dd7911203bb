"""Evaluation: zero-shot classification and image-text retrieval over the loaders of an
evaluation plan, which each datamodule hands over."""

from limoe.eval.evaluation import Evaluation, encode_pairs, gather_split
from limoe.eval.plan import EvalPlan, EvalSet, ZeroShotTask
from limoe.eval.retrieval import retrieval_metrics
from limoe.eval.zeroshot import topk_accuracy, zeroshot_accuracy, zeroshot_classifier

__all__ = [
    "EvalPlan",
    "EvalSet",
    "Evaluation",
    "ZeroShotTask",
    "encode_pairs",
    "gather_split",
    "retrieval_metrics",
    "topk_accuracy",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]
