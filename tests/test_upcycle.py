"""Sparse upcycling: ``model.upcycle_from=CKPT`` starts a LIMoE from a trained dense one-tower
checkpoint whose features it reproduces before any step, while its fresh routers learn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from limoe import create_model, create_model_and_transforms
from limoe.checkpoint import CheckpointError
from limoe.data.loading import first_pairs
from limoe.lit import ContrastiveModule
from limoe.train import build_datamodule, build_module, compose, train

RUN = ["experiment=smoke", "data.train_size=256", "data.batch_size=32", "trainer.max_steps=8",
       "test=false", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false"]  # fmt: skip


def _run(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    run_dir = tmp_path_factory.mktemp(name)
    train(compose([*RUN, *overrides], run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory) -> Path:
    """Eight steps of the dense one-tower (norm gains, biases and MLPs moved off their init)."""
    return _run(tmp_path_factory, "dense", ["model=dense"])


# Upcycling needs gates that sum to 1 (renormalised over the top-k).
UPCYCLE = ["model=limoe", "model.moe.router.renormalize_gates=true"]


def _upcycled(ckpt: Path, *overrides: str, upcycle: Sequence[str] = UPCYCLE) -> ContrastiveModule:
    cfg = compose([*RUN, *upcycle, f"model.upcycle_from={ckpt}", *overrides])
    torch.manual_seed(0)
    return build_module(cfg)


def _val_batch(n: int = 64):
    return first_pairs(build_datamodule(compose(RUN)).dataset("val"), n)


def _features(model, images, tokens):
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.moe.router.top_k=2"], ["size.num_experts=32", "model.moe.router.top_k=2"]],
    ids=["top1", "top2", "e32_top2"],
)
def test_upcycled_features_equal_the_dense_checkpoints(dense_ckpt, overrides):
    dense = ContrastiveModule.load_from_checkpoint(dense_ckpt, map_location="cpu").model
    model = _upcycled(dense_ckpt, *overrides).model
    images, tokens = _val_batch()
    for ours, theirs in zip(_features(model, images, tokens), _features(dense, images, tokens)):
        assert (ours - theirs).abs().max().item() < 1e-5
    # Every expert is its block's dense MLP, unscaled: checked against the checkpoint's tensors.
    for i in model.moe_layers:
        layer, mlp = model.blocks[i].mlp, dense.blocks[i].mlp
        for e in range(layer.num_experts):
            assert torch.equal(layer.experts.w1[e], mlp.fc1.weight.t())
            assert torch.equal(layer.experts.b1[e], mlp.fc1.bias)
            assert torch.equal(layer.experts.w2[e], mlp.fc2.weight.t())
            assert torch.equal(layer.experts.b2[e], mlp.fc2.bias)
    # Everything else is copied.
    moe = tuple(f"blocks.{i}.mlp." for i in model.moe_layers)
    for name, tensor in dense.state_dict().items():
        if not name.startswith(moe):
            assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_features_stay_the_dense_ones_under_a_sharp_router_at_32_experts(
    dense_ckpt, top_k
):
    # Routers as confident as trained ones (top-1 probability near 1): the copied experts'
    # update is still the dense MLP's, where gates that do not sum to 1 would scale it.
    dense = ContrastiveModule.load_from_checkpoint(dense_ckpt, map_location="cpu").model
    model = _upcycled(dense_ckpt, "size.num_experts=32", f"model.moe.router.top_k={top_k}").model
    torch.manual_seed(1)
    for i in model.moe_layers:
        torch.nn.init.normal_(model.blocks[i].mlp.router.weight, std=10.0)
    images, tokens = _val_batch()
    model.eval()
    with torch.no_grad():
        routing = model(images, tokens)["routing"]
    for record in routing:
        assert record.probs.amax(dim=-1).median() > 0.99  # sharp
        assert record.expert_index[:, 0].unique().numel() > 2  # on several experts
    for ours, theirs in zip(_features(model, images, tokens), _features(dense, images, tokens)):
        assert (ours - theirs).abs().max().item() < 1e-5


def test_upcycled_routers_spread_tokens_and_learn_from_the_contrastive_loss(dense_ckpt):
    # No auxiliary loss: any router gradient comes through the gates, from the contrastive loss.
    off = [f"model.moe.losses.{w}_weight=0" for w in
           ("importance", "load", "vmoe_load", "local_entropy", "global_entropy")]  # fmt: skip
    module = _upcycled(dense_ckpt, *off)
    images, tokens = _val_batch()
    module.model.eval()
    with torch.no_grad():
        routing = module.model(images, tokens)["routing"]
    for record in routing:
        # Probabilities of 1/E, yet the tiny logits differ between tokens: no tie onto one
        # expert; the renormalised top-1 gate is 1.
        torch.testing.assert_close(record.probs, torch.full_like(record.probs, 1 / 4), atol=1e-5,
                                   rtol=0)  # fmt: skip
        assert torch.equal(record.gates, torch.ones_like(record.gates))
        assert record.expert_index.unique().numel() > 1
    module.model.train()
    loss, contrastive, aux, _ = module.compute_loss(images, tokens)
    assert aux.item() == 0.0
    loss.backward()
    for i in module.model.moe_layers:
        grad = module.model.blocks[i].mlp.router.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 1e-6


def test_an_upcycled_run_trains_and_reloads_without_the_dense_checkpoint(
    dense_ckpt, tmp_path_factory
):
    ckpt = _run(tmp_path_factory, "upcycled", [*UPCYCLE, f"model.upcycle_from={dense_ckpt}"])
    module = ContrastiveModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert "upcycle_from" not in module.hparams["model"]
    assert module.model.moe_layers == [0, 1, 2, 3]
    # The dense tower continued the same way: a warm start that copies every weight.
    warm = _upcycled(dense_ckpt, "model=dense").model
    dense = ContrastiveModule.load_from_checkpoint(dense_ckpt, map_location="cpu").model
    for name, tensor in dense.state_dict().items():
        assert torch.equal(warm.state_dict()[name], tensor)


def test_checkpoints_that_do_not_fit_fail_with_one_line(dense_ckpt, tmp_path_factory, tmp_path):
    limoe_ckpt = _run(tmp_path_factory, "limoe", ["model=limoe", "trainer.max_steps=1"])
    with pytest.raises(ValueError, match=r"not a dense one-tower checkpoint of this size: it has "
                       r"no blocks\.0\.mlp\.fc1\.weight \(upcycle from model=dense"):  # fmt: skip
        _upcycled(limoe_ckpt)
    with pytest.raises(ValueError, match=r"does not fit this model: the checkpoint holds "
                       r"image_pos as \[1, 16, 32\], this model as \[1, 16, 16\]"):  # fmt: skip
        _upcycled(dense_ckpt, "size.width=16", "size.embed_dim=16")
    with pytest.raises(CheckpointError, match=r"^model\.upcycle_from=.*nope\.ckpt does not exist$"):
        _upcycled(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="router=topk"):
        _upcycled(dense_ckpt, "router@model.moe.router=soft", upcycle=UPCYCLE[:1])
    with pytest.raises(ValueError, match=r"needs model\.moe\.router\.renormalize_gates=true"):
        _upcycled(dense_ckpt, "model.moe.router.renormalize_gates=false")


def test_every_builder_upcycles_alike(dense_ckpt):
    """The LightningModule, create_model and create_model_and_transforms share build_model:
    from the same seed, the same upcycled weights."""
    overrides = ["experiment=smoke", *UPCYCLE[1:], f"model.upcycle_from={dense_ckpt}"]
    trained = _upcycled(dense_ckpt).model.state_dict()
    torch.manual_seed(0)
    created = create_model("limoe", overrides).state_dict()
    torch.manual_seed(0)
    loaded = create_model_and_transforms("limoe", overrides=overrides)[0].state_dict()
    assert trained.keys() == created.keys() == loaded.keys()
    for name, tensor in trained.items():
        assert torch.equal(created[name], tensor) and torch.equal(loaded[name], tensor), name
