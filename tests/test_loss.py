"""The contrastive loss of every arm: CLIP's softmax loss or SigLIP's sigmoid loss
(``loss=siglip``), open_clip's own, against the sums written out by hand."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST_DEV_RUN

from limoe.lit.module import build_loss
from limoe.train import build_datamodule, build_module, build_trainer, compose


def siglip_by_hand(image: torch.Tensor, text: torch.Tensor, scale, bias) -> torch.Tensor:
    """SigLIP: -1/B sum_ij log sigmoid(z_ij (scale <x_i, y_j> + bias)), z = 1 on the
    diagonal and -1 off it."""
    loss = 0.0
    batch = image.shape[0]
    for i in range(batch):
        for j in range(batch):
            z = 1.0 if i == j else -1.0
            loss = loss - F.logsigmoid(z * (scale * image[i] @ text[j] + bias))
    return loss / batch


def clip_by_hand(image: torch.Tensor, text: torch.Tensor, scale) -> torch.Tensor:
    logits = scale * image @ text.t()
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@pytest.mark.parametrize("model", ["limoe", "dense", "clip"])
def test_siglip_trains_every_arm_from_its_start(model, tmp_path):
    """``loss=siglip``: the model starts at scale 10 and bias -10, the step's loss is SigLIP's
    sum over the batch's pairs, and one step moves the bias."""
    cfg = compose(["experiment=smoke", "trainer=cpu", f"model={model}", "loss=siglip",
                   *FAST_DEV_RUN], tmp_path)  # fmt: skip
    L.seed_everything(0)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    assert module.model.logit_scale.exp().item() == pytest.approx(10.0)
    assert module.model.logit_bias.item() == -10.0
    images, tokens = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        loss, contrastive, _, out = module.compute_loss(images, tokens)
        expected = siglip_by_hand(out["image_features"], out["text_features"],
                                  out["logit_scale"], out["logit_bias"])  # fmt: skip
    torch.testing.assert_close(contrastive, expected, rtol=1e-5, atol=1e-5)
    build_trainer(cfg).fit(module, datamodule=datamodule)
    assert module.model.logit_bias.item() != -10.0  # learned, and not weight-decayed away


def test_the_default_loss_is_clips():
    cfg = compose([])
    loss = build_loss(cfg.loss)
    image = F.normalize(torch.randn(6, 8), dim=-1)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(math.exp(2.0))
    torch.testing.assert_close(loss(image, text, scale), clip_by_hand(image, text, scale))


def test_siglip_without_a_logit_bias_is_one_line(tmp_path):
    cfg = compose(["experiment=smoke", "loss=siglip", "model.init_logit_bias=null"], tmp_path)
    with pytest.raises(ValueError, match="loss=siglip needs a model with a logit bias"):
        build_module(cfg)


def test_a_loss_that_is_not_open_clips_is_one_line():
    with pytest.raises(ValueError, match="loss._target_ must be open_clip.loss.ClipLoss or"):
        build_loss({"_target_": "torch.nn.MSELoss"})
