"""Image-text retrieval metrics: open_clip's own (``open_clip_train``'s ``get_clip_metrics``)."""

from __future__ import annotations

import torch
from open_clip_train.train import get_clip_metrics
from torch import Tensor


def retrieval_metrics(
    image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor = 1.0
) -> dict[str, float]:
    """``image_to_text_R@{1,5,10}``, ``..._mean_rank``, ``..._median_rank`` and the same for
    ``text_to_image``, for paired, L2-normalised features, as open_clip's evaluation reports
    them: pair ``i`` is the only match of image ``i`` and of text ``i``, and a query's rank is
    its match's place in ``argsort`` of ``logit_scale * image @ text.T``. Ties (duplicate
    captions) are broken as that sort breaks them, so the figures equal open_clip's on the
    same features and scale."""
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image features {list(image_features.shape)} and text features "
            f"{list(text_features.shape)} must be paired row by row"
        )
    metrics = get_clip_metrics(
        image_features.float(), text_features.float(), torch.as_tensor(logit_scale).float()
    )
    return {name: float(value) for name, value in metrics.items()}
