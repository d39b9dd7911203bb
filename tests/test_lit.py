"""The LightningModule's pieces: schedule, weight-decay groups, random states for exact
resume, routing statistics."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch

from limoe.lit.module import ContrastiveModule, warmup_cosine
from limoe.lit.resume import random_states, restore_random_states
from limoe.moe import Routing
from limoe.moe.statistics import expert_counts, routing_stats


def test_warmup_cosine_by_hand():
    assert warmup_cosine(0, warmup_steps=4, total_steps=14, min_ratio=0.0) == 0.25
    assert warmup_cosine(3, 4, 14, 0.0) == 1.0
    assert warmup_cosine(4, 4, 14, 0.0) == 1.0  # cosine starts at its top
    assert warmup_cosine(9, 4, 14, 0.0) == pytest.approx(0.5)  # halfway: (1 + cos(pi/2)) / 2
    assert warmup_cosine(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(99, 4, 14, 0.0) == pytest.approx(0.0)


def test_no_weight_decay_on_gains_biases_and_temperature():
    moe = {"num_experts": 4}
    model = {"_target_": "limoe.models.LIMoE", "width": 16, "embed_dim": 16, "depth": 2,
             "num_heads": 2, "moe_layers": [1], "moe": moe, "image_pos_embed": "learned"}  # fmt: skip
    module = ContrastiveModule(model, {"weight_decay": 0.05})
    decayed, kept = module.param_groups()
    assert decayed["weight_decay"] == 0.05 and kept["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed, kept = ({names[id(p)] for p in g["params"]} for g in (decayed, kept))
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "blocks.1.mlp.experts.b1",
            "blocks.1.mlp.experts.b2", "logit_scale"} <= kept  # fmt: skip
    assert {"blocks.1.mlp.experts.w1", "token_embed.weight", "image_pos", "text_pos",
            "blocks.1.mlp.router.weight", "blocks.0.mlp.fc1.weight"} <= decayed  # fmt: skip
    assert decayed | kept == set(names.values()) and not decayed & kept
    # The order of the weights indexes the optimiser's state in checkpoints.
    assert module.optimizer_params() == [p for g in module.param_groups() for p in g["params"]]


def test_a_continued_run_joins_the_longer_schedule_with_fused_adamw():
    model = {"_target_": "limoe.models.LIMoE", "width": 16, "embed_dim": 16, "depth": 1,
             "num_heads": 2, "moe_layers": []}  # fmt: skip
    optim = {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.98], "eps": 1e-6,
             "warmup_steps": 4, "min_lr_ratio": 0.0, "schedule_steps": 14,
             "schedule_from_step": 9}  # fmt: skip
    config = ContrastiveModule(model, optim).configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert all(group["fused"] for group in optimizer.param_groups)
    # Step 0 of this run is step 9 of the 14-step schedule: half the peak rate, then decaying.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * warmup_cosine(9, 4, 14, 0.0))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    optimizer.step()
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * warmup_cosine(10, 4, 14, 0.0))
    unfused = ContrastiveModule(model, {**optim, "fused": False}).build_optimizer()
    assert not any(group["fused"] for group in unfused.param_groups)


def test_fused_adamw_steps_as_the_unfused_one(device):
    """``optim.fused`` (torch's one-kernel AdamW, on CPU or, with ``--device cuda``, on the
    GPU) moves every weight as the unfused loop does, decoupled weight decay included."""
    model = {"_target_": "limoe.models.LIMoE", "width": 16, "embed_dim": 16, "depth": 2,
             "num_heads": 2, "moe_layers": [1], "moe": {"num_experts": 4}}  # fmt: skip
    # eps 1e-3: where a gradient is ~0 (the key bias, which the softmax ignores) Adam divides
    # rounding noise by rounding noise, and the two kernels round differently.
    optim = {"lr": 1e-2, "weight_decay": 0.05, "betas": [0.9, 0.98], "eps": 1e-3}
    images = torch.randn(4, 3, 56, 56, device=device)
    tokens = torch.zeros(4, 16, dtype=torch.long, device=device)
    tokens[:, :4] = torch.tensor([49406, 320, 1929, 49407], device=device)
    weights = {}
    for fused in (True, False):
        torch.manual_seed(0)
        module = ContrastiveModule(model, {**optim, "fused": fused}).to(device)
        optimizer = module.build_optimizer()
        assert all(group["fused"] == (fused or None) for group in optimizer.param_groups)
        for _ in range(3):
            optimizer.zero_grad()
            module.compute_loss(images, tokens)[0].backward()
            optimizer.step()
        weights[fused] = {n: p.detach().cpu() for n, p in module.named_parameters()}
    torch.manual_seed(0)
    start = ContrastiveModule(model, optim)  # the weights both runs started from
    for name, param in start.named_parameters():
        value = weights[True][name]
        torch.testing.assert_close(value, weights[False][name], rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(value, param.detach()) != param.requires_grad, name  # trained: moved


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_random_states_restore_every_stream_through_a_weights_only_checkpoint():
    """The one use of Lightning's private ``_collect_rng_states``/``_set_rng_states``: this
    fails if they stop covering torch, numpy and Python, or stop loading weights-only."""
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    buffer = io.BytesIO()
    torch.save(random_states(), buffer)
    expected = draws()
    assert draws() != expected  # the streams moved on
    restore_random_states(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert draws() == expected


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


def test_the_module_evaluates_the_plans_it_is_handed_without_a_datamodule(tmp_path):
    """Validation through plain dataloaders: the plans come with the module, not from
    ``trainer.datamodule``; without either, one line says so."""
    from limoe.train import build_datamodule, build_module, build_trainer, compose

    cfg = compose(["experiment=smoke", "callbacks.progress_bar=null"], tmp_path)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg, logger=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    assert 0.0 <= metrics["val/image_to_text_R@1"] <= 1.0 and "val/shape_zeroshot_top1" in metrics
    module.eval_plans = None
    with pytest.raises(ValueError, match="nothing to evaluate: give ContrastiveModule eval_plans"):
        trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
