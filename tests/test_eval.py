"""Retrieval and zero-shot metrics against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from limoe.eval import gather_split, retrieval_metrics, topk_accuracy


def test_retrieval_recall_by_hand():
    # 3 pairs, features chosen so that the similarity matrix is known:
    # image 0 -> text 0 best (rank 0); image 1 -> text 0 scores above text 1 (rank 1);
    # image 2 -> text 2 is the worst (rank 2).
    image = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]])
    sims = image @ text.T
    assert sims[1, 0] > sims[1, 1]  # 0.8 > 0.6
    m = retrieval_metrics(image, text, ks=(1, 2, 3))
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert m["image_to_text_R@3"] == 1.0
    # text 0: image 0 = 1.0, image 1 = 0.8 -> rank 0; text 1: image 2 = 1.0 > image 1 = 0.6 ->
    # rank 1; text 2: image 0 = 0.6 > image 1 = 0.0 > image 2 = -0.8 -> rank 2.
    assert m["text_to_image_R@1"] == pytest.approx(1 / 3)
    assert m["text_to_image_R@2"] == pytest.approx(2 / 3)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 3))
    assert acc[1] == pytest.approx(1 / 3)
    assert acc[2] == pytest.approx(2 / 3)
    assert acc[3] == 1.0


def test_gather_split_keeps_each_sample_once_in_order_without_the_invalid():
    """Two processes' batches as DDP's sampler gives them: interleaved indices, sample 0
    repeated to even the shards out, and sample 3 unreadable."""
    rank0 = {"index": torch.tensor([0, 2, 4]), "valid": torch.tensor([True, True, True]),
             "image": torch.tensor([[0.0], [2.0], [4.0]])}  # fmt: skip
    rank1 = {"index": torch.tensor([1, 3, 0]), "valid": torch.tensor([True, False, True]),
             "image": torch.tensor([[1.0], [3.0], [0.0]])}  # fmt: skip

    def all_gather(local: dict) -> dict:  # what LightningModule.all_gather returns: [W, ...]
        other = {k: v.long() if k == "valid" else v for k, v in rank1.items()}
        return {k: torch.stack([v, other[k]]) for k, v in local.items()}

    split = gather_split([rank0], all_gather)
    assert split["index"].tolist() == [0, 1, 2, 4]
    assert split["image"][:, 0].tolist() == [0.0, 1.0, 2.0, 4.0]
    alone = gather_split([rank1, rank0], None)  # one process, two batches: same split
    assert alone["index"].tolist() == [0, 1, 2, 4]
