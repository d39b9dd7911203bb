"""Image-text retrieval recall, as open_clip's evaluation reports it."""

from __future__ import annotations

from torch import Tensor


def retrieval_metrics(
    image_features: Tensor, text_features: Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """``image_to_text_R@k`` and ``text_to_image_R@k`` for paired, L2-normalised features.

    Pair ``i`` is the only correct match of image ``i`` and of text ``i``; R@k is the fraction
    of queries whose match ranks in the top k (ties count against the query).
    """
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image features {list(image_features.shape)} and text features "
            f"{list(text_features.shape)} must be paired row by row"
        )
    logits = image_features.float() @ text_features.float().T
    metrics = {}
    for name, scores in (("image_to_text", logits), ("text_to_image", logits.T)):
        correct = scores.diagonal().unsqueeze(1)
        rank = (scores >= correct).sum(dim=1) - 1  # number of other candidates scored >= match
        for k in ks:
            metrics[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return metrics
