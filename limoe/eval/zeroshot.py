"""Zero-shot classification from class names and prompt templates (open_clip's recipe)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import Tensor, nn


def zeroshot_classifier(
    model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """Class embeddings [embed_dim, num_classes]: the normalised mean over templates."""
    device = next(model.parameters()).device
    return build_zero_shot_classifier(
        model, tokenizer, classnames, templates, num_classes_per_batch=None, device=device
    )


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1,)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels.unsqueeze(1)
    return {k: hit[:, :k].any(dim=1).float().mean().item() for k in ks}


@torch.no_grad()
def zeroshot_accuracy(image_features: Tensor, classifier: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of normalised image features against a zero-shot classifier."""
    return topk_accuracy(image_features.float() @ classifier.float(), labels)[1]
