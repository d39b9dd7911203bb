"""A linear probe on frozen image features, as LAION's CLIP_benchmark trains one
(``clip_benchmark.metrics.linear_probe``, after CLIP's appendix A.3 with AdamW in place of
L-BFGS): logistic regression (one linear layer, cross-entropy) trained by AdamW for a few
epochs of shuffled batches, the learning rate on a cosine from its base value without warmup;
with a validation share, the weight decay searched on a log grid (7 points, then halving the
step around the best), the final probe trained on train and validation together.

``train_probe`` draws the same numbers as CLIP_benchmark's ``train`` from the same seed, and
the search visits the same weight decays, so on the same features the two give the same
probe (``tests/test_probe.py`` runs both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from limoe.eval.zeroshot import topk_accuracy

# CLIP_benchmark's grid: 97 weight decays from 1e-6 to 100; the search starts at the 7 of
# them that np.logspace(-6, 2, 7) also gives (compared as floats, as CLIP_benchmark does).
WEIGHT_DECAYS: list[float] = np.logspace(-6, 2, num=97).tolist()
FIRST_POINTS: list[int] = [
    i for i, wd in enumerate(WEIGHT_DECAYS) if wd in np.logspace(-6, 2, num=7).tolist()
]


@dataclass(frozen=True)
class ProbeOptions:
    """CLIP_benchmark's defaults: ``--fewshot_lr 0.1 --fewshot_epochs 10 --batch_size 64
    --seed 0``; ``val_proportion`` None trains with no weight decay, as CLIP_benchmark
    without a validation split does."""

    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    val_proportion: float | None = None

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.epochs >= 1 and self.batch_size >= 1):
            raise ValueError("probe: lr must be > 0, epochs and batch_size >= 1")
        if self.val_proportion is not None and not 0 < self.val_proportion < 1:
            raise ValueError(f"probe.val_proportion must be in (0, 1), got {self.val_proportion}")


def train_probe(
    features: Tensor, labels: Tensor, num_classes: int, weight_decay: float, options: ProbeOptions
) -> nn.Linear:
    """Logistic regression on ``features [N, D]``: a seeded ``Linear(D, num_classes)``,
    AdamW, one cosine step of the learning rate per batch."""
    torch.manual_seed(options.seed)
    probe = nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=options.lr, weight_decay=weight_decay)
    loader = DataLoader(
        TensorDataset(features, labels), batch_size=options.batch_size, shuffle=True
    )
    steps = options.epochs * len(loader)
    for epoch in range(options.epochs):
        for i, (x, y) in enumerate(loader):
            step = i + epoch * len(loader)
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * (1 + np.cos(np.pi * step / steps)) * options.lr
            optimizer.zero_grad()
            F.cross_entropy(probe(x), y).backward()
            optimizer.step()
    return probe


@torch.no_grad()
def top1(probe: nn.Linear, features: Tensor, labels: Tensor) -> float:
    return (probe(features).argmax(1) == labels).float().mean().item()


def search_weight_decay(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    options: ProbeOptions,
) -> float:
    """The weight decay of the best validation top-1: the 7 first points, then the best's
    neighbours at a step of 8, 4, 2 and 1 grid points (ties keep the first found)."""

    def best(points: list[int]) -> int:
        found, best_accuracy = 0, 0.0  # as CLIP_benchmark: index 0 if none beats 0
        for point in points:
            probe = train_probe(*train, num_classes, WEIGHT_DECAYS[point], options)
            accuracy = top1(probe, *val)
            if accuracy > best_accuracy:
                found, best_accuracy = point, accuracy
        return found

    peak, span = best(FIRST_POINTS), 8
    while span > 0:
        peak = best([max(peak - span, 0), peak, min(peak + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[peak]


def mean_per_class_recall(predictions: Tensor, labels: Tensor) -> float:
    """The mean over the classes present in ``labels`` of the share predicted right
    (scikit-learn's ``balanced_accuracy_score``)."""
    recalls = [(predictions[labels == c] == c).float().mean() for c in labels.unique()]
    return torch.stack(recalls).mean().item()


def linear_probe(
    train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], options: ProbeOptions
) -> dict[str, float]:
    """``acc1``, ``acc5`` (NaN under 6 classes in the test labels, as CLIP_benchmark),
    ``mean_per_class_recall`` and the ``weight_decay`` used, of a probe trained on
    ``(features, labels)`` and tested on another pair."""
    features, labels = train
    num_classes = int(labels.max()) + 1
    weight_decay = 0.0
    if options.val_proportion is not None:
        generator = torch.Generator().manual_seed(options.seed)
        order = torch.randperm(len(labels), generator=generator)
        n_val = max(1, math.floor(len(labels) * options.val_proportion))
        fit, val = order[n_val:], order[:n_val]
        held_out = (features[val], labels[val])
        weight_decay = search_weight_decay((features[fit], labels[fit]), held_out, num_classes,
                                           options)  # fmt: skip
    probe = train_probe(features, labels, num_classes, weight_decay, options)
    with torch.no_grad():
        logits = probe(test[0])
    top = topk_accuracy(logits, test[1], ks=(1, 5))
    return {
        "acc1": top[1],
        "acc5": top[5] if int(test[1].max()) >= 5 else float("nan"),
        "mean_per_class_recall": mean_per_class_recall(logits.argmax(1), test[1]),
        "weight_decay": weight_decay,
    }
