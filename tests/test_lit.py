"""The LightningModule's pieces: schedule, weight-decay groups, routing statistics."""

from __future__ import annotations

import math

import pytest
import torch

from limoe.lit.module import no_weight_decay, warmup_cosine
from limoe.lit.routing import expert_counts, routing_stats
from limoe.moe import Routing


def test_warmup_cosine_by_hand():
    assert warmup_cosine(0, warmup_steps=4, total_steps=14, min_ratio=0.0) == 0.25
    assert warmup_cosine(3, 4, 14, 0.0) == 1.0
    assert warmup_cosine(4, 4, 14, 0.0) == 1.0  # cosine starts at its top
    assert warmup_cosine(9, 4, 14, 0.0) == pytest.approx(0.5)  # halfway: (1 + cos(pi/2)) / 2
    assert warmup_cosine(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(99, 4, 14, 0.0) == pytest.approx(0.0)


def test_no_weight_decay_on_gains_biases_and_temperature():
    assert no_weight_decay("blocks.0.norm1.weight", torch.zeros(4))
    assert no_weight_decay("blocks.3.mlp.experts.b1", torch.zeros(8, 4))
    assert no_weight_decay("logit_scale", torch.zeros(()))
    assert not no_weight_decay("blocks.3.mlp.experts.w1", torch.zeros(8, 4, 4))
    assert not no_weight_decay("token_embed.weight", torch.zeros(10, 4))


def hand_routing() -> Routing:
    # 6 tokens: 4 image (modality 0), 2 text (modality 1); 3 experts; top-1.
    # image tokens -> experts 0, 0, 1, 2 (the last one dropped); text -> 2, 2.
    return Routing(
        expert_index=torch.tensor([[0], [0], [1], [2], [2], [2]]),
        gates=torch.full((6, 1), 0.5),
        dropped=torch.tensor([[False], [False], [False], [True], [False], [False]]),
        probs=torch.full((6, 3), 1 / 3),
        modality=torch.tensor([0, 0, 0, 0, 1, 1]),
        capacity=2,
        aux_losses={"load/image": torch.tensor(1.5), "load/text": torch.tensor(3.0)},
        aux_loss=torch.tensor(0.0),
    )


def test_expert_counts_and_shares_by_hand():
    counts = expert_counts(hand_routing())
    assert counts.tolist() == [[2, 0], [1, 0], [0, 2]]
    stats = routing_stats([hand_routing(), hand_routing()], layers=[3, 5])
    assert stats["routing/layer3/expert0/image"] == pytest.approx(0.5)
    assert stats["routing/layer3/expert1/image"] == pytest.approx(0.25)
    assert stats["routing/layer3/expert2/image"] == pytest.approx(0.0)
    assert stats["routing/layer5/expert2/text"] == pytest.approx(1.0)
    assert stats["dropped/image"] == pytest.approx(0.25)
    assert stats["dropped/text"] == pytest.approx(0.0)
    assert stats["aux/load/text"] == pytest.approx(3.0)
    assert not any(math.isnan(float(v)) for v in stats.values())
