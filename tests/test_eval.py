"""Retrieval and zero-shot metrics against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from limoe.eval import gather_split, retrieval_metrics, topk_accuracy


def test_retrieval_recall_and_ranks_by_hand():
    # 3 pairs, features chosen so that the similarity matrix is known:
    # image 0 -> text 0 best (rank 0); image 1 -> text 0 scores above text 1 (rank 1);
    # image 2 -> text 2 is the worst (rank 2).
    image = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]])
    sims = image @ text.T
    assert sims[1, 0] > sims[1, 1]  # 0.8 > 0.6
    m = retrieval_metrics(image, text, logit_scale=100.0)
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_R@5"] == m["image_to_text_R@10"] == 1.0
    assert m["image_to_text_mean_rank"] == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert m["image_to_text_median_rank"] == 2.0
    # text 0: image 0 = 1.0, image 1 = 0.8 -> rank 0; text 1: image 2 = 1.0 > image 1 = 0.6 ->
    # rank 1; text 2: image 0 = 0.6 > image 1 = 0.0 > image 2 = -0.8 -> rank 2.
    assert m["text_to_image_R@1"] == pytest.approx(1 / 3)
    assert m["text_to_image_mean_rank"] == pytest.approx(2.0)


def test_retrieval_equals_open_clip_get_clip_metrics_with_duplicate_captions():
    """open_clip's evaluation ranks by ``argsort``, which breaks ties between duplicate
    captions its own way; the metrics must be open_clip's on the same features."""
    from open_clip_train.train import get_clip_metrics

    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(300, 16), dim=-1)
    text = torch.nn.functional.normalize(image + 0.2 * torch.randn(300, 16), dim=-1)
    text[100:140] = text[60:100]  # 40 captions repeated: exact ties for 80 queries
    image[200:220] = image[180:200]
    scale = torch.tensor(100.0)
    ours = retrieval_metrics(image, text, scale)
    theirs = get_clip_metrics(image, text, scale)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-6), key
    # The ties matter: counting every tied caption against the query gives another R@1.
    scores = image @ text.T
    ties_against = ((scores >= scores.diagonal()[:, None]).sum(1) - 1 < 1).float().mean()
    assert abs(float(ties_against) - ours["image_to_text_R@1"]) > 1e-3


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


def evaluated_features(model, images, tokens, batch_size: int) -> dict:
    """What ``Evaluation`` keeps of one retrieval split fed in batches of ``batch_size``."""
    from limoe.eval import EvalPlan, EvalSet, Evaluation

    evaluation = Evaluation(model, EvalPlan(sets=(EvalSet("test", samples=[]),), tokenizer=None))
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        index = torch.arange(len(images))[part]
        evaluation.add({"index": index, "valid": torch.ones(len(index), dtype=torch.bool),
                        "image": images[part], "text": tokens[part]})  # fmt: skip
    return gather_split(evaluation.features[0], None), evaluation


def tiny_pairs(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    tokens = torch.zeros(n, 8, dtype=torch.long)
    for i in range(n):
        words = torch.randint(300, 900, (2 + i % 5,))
        tokens[i, : len(words) + 2] = torch.cat(
            [torch.tensor([49406]), words, torch.tensor([49407])]
        )
    return torch.randn(n, 3, 16, 16), tokens


def tiny_limoe(**moe):
    from limoe.models import LIMoE

    torch.manual_seed(0)
    return LIMoE(embed_dim=16, image_size=16, patch_size=4, width=32, depth=2, num_heads=2,
                 context_length=8, moe_layers=[1], moe={"num_experts": 4, **moe}).eval()  # fmt: skip


def test_dropless_evaluation_features_do_not_depend_on_the_batch_size():
    model = tiny_limoe(capacity_factor=None)
    images, tokens = tiny_pairs()
    small, _ = evaluated_features(model, images, tokens, batch_size=3)
    whole, _ = evaluated_features(model, images, tokens, batch_size=12)
    for key in ("image", "text"):
        torch.testing.assert_close(small[key], whole[key], rtol=1e-5, atol=1e-5)


def test_evaluation_routes_a_batch_of_pairs_together_as_training_does():
    """With a finite capacity the images and captions of a batch compete for the same
    experts: the evaluated features are ``forward``'s on the whole batch, not those of each
    modality encoded alone, and the metrics are open_clip's on them. An eval capacity of
    'dropless' makes them independent of the batch again."""
    from open_clip_train.train import get_clip_metrics

    model = tiny_limoe(capacity_factor=0.5)
    images, tokens = tiny_pairs()
    features, evaluation = evaluated_features(model, images, tokens, batch_size=12)
    with torch.no_grad():
        out = model(images, tokens)
        alone = model.encode_image(images, normalize=True)
    torch.testing.assert_close(features["image"], out["image_features"])
    torch.testing.assert_close(features["text"], out["text_features"])
    assert not torch.allclose(features["image"], alone, atol=1e-3)  # routed without the text
    metrics = evaluation.compute()
    theirs = get_clip_metrics(out["image_features"], out["text_features"], out["logit_scale"])
    assert metrics["test/image_to_text_R@1"] == pytest.approx(float(theirs["image_to_text_R@1"]))
    assert metrics["test/text_to_image_mean_rank"] == pytest.approx(
        float(theirs["text_to_image_mean_rank"])
    )
    model.blocks[1].mlp.eval_capacity_factor = "dropless"
    small, _ = evaluated_features(model, images, tokens, batch_size=3)
    whole, _ = evaluated_features(model, images, tokens, batch_size=12)
    torch.testing.assert_close(small["image"], whole["image"], rtol=1e-5, atol=1e-5)
