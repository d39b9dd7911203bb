"""The paper-size presets: LIMoE-B/32, B/16 and L/16, the dense one-tower at each size, and
the 224 px / 77-token data configs that go with them (the CLIP presets: test_compare.py)."""

from __future__ import annotations

import csv
import math

import open_clip
import pytest
import torch

from limoe import create_model
from limoe.models import parameter_counts
from limoe.train import build_datamodule, build_module, build_trainer, compose

# name: (width, depth, heads, patch, experts, joint embedding) of the paper's ViT-B and ViT-L.
PAPER = {
    "b32": (768, 12, 12, 32, 8, 512),
    "b16": (768, 12, 12, 16, 8, 512),
    "l16": (1024, 24, 16, 16, 32, 768),
}
DATA_224 = ["data=csv_224"]


def one_tower_parameters(width, depth, patch, experts, embed, moe_layers, image=224, context=77,
                         vocab=49408) -> tuple[int, int]:  # fmt: skip
    """(total, active per token) parameters of the one tower, counted by hand."""
    hidden = 4 * width
    mlp = width * hidden + hidden + hidden * width + width
    block = (3 * width * width + 3 * width) + (width * width + width) + 4 * width  # attn, norms
    total = 3 * patch * patch * width + width + (image // patch) ** 2 * width  # patches, pos
    total += vocab * width + context * width + 2 * width  # tokens, text pos, modality
    for i in range(depth):
        total += block + (experts * mlp + experts * width if i in moe_layers else mlp)
    total += 4 * width + 2 * width * embed + 1  # final norms, projections, temperature
    return total, total - len(moe_layers) * (experts - 1) * mlp


@pytest.mark.parametrize("size", PAPER)
def test_limoe_and_dense_presets_have_the_paper_architecture(size):
    width, depth, heads, patch, experts, embed = PAPER[size]
    cfg = compose([f"model=limoe_{size}", *DATA_224]).model
    every_other = list(range(1, depth, 2))
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.mlp_ratio, cfg.embed_dim) == (
        width, depth, heads, patch, 4.0, embed)  # fmt: skip
    assert (cfg.image_size, cfg.context_length, list(cfg.moe_layers)) == (224, 77, every_other)
    moe = cfg.moe
    router = moe.router
    assert (router._target_, router.top_k, router.batch_priority) == (
        "limoe.moe.TopKRouter",
        1,
        True,
    )
    assert (moe.num_experts, moe.capacity_factor) == (experts, 1.0)
    assert moe.losses.local_entropy_weight > 0 and moe.losses.global_entropy_weight > 0
    dense = compose([f"model=dense_{size}", *DATA_224]).model
    assert list(dense.moe_layers) == []
    assert {k: v for k, v in dense.items() if k != "moe_layers"} == {
        k: v for k, v in cfg.items() if k != "moe_layers"
    }
    # Built on the meta device (no memory), the parameters are the hand count's.
    for name, layers in ((f"limoe_{size}", every_other), (f"dense_{size}", [])):
        with torch.device("meta"):
            model = create_model(name, DATA_224)
        total, active = one_tower_parameters(width, depth, patch, experts, embed, layers)
        assert parameter_counts(model) == {"params_total": total, "params_active_per_token": active}


def test_limoe_l16_holds_3_5_billion_parameters_and_runs_355_million_per_token():
    with torch.device("meta"):
        counts = parameter_counts(create_model("limoe_l16", DATA_224))
    assert round(counts["params_total"] / 1e9, 2) == 3.48
    assert round(counts["params_active_per_token"] / 1e6) == 356


@pytest.mark.parametrize("data", ["csv_224", "webdataset_224"])
def test_paper_data_configs_are_224_px_77_tokens_with_open_clips_normalisation(data, tmp_path):
    train = tmp_path / ("train.tar" if data.startswith("webdataset") else "train.csv")
    run = compose([f"data={data}", f"data.train_data={train}"])  # no file is read yet
    cfg, datamodule = run.data, build_datamodule(run)
    assert (cfg.image_size, cfg.context_length) == (224, 77)
    assert tuple(datamodule.mean) == open_clip.OPENAI_DATASET_MEAN
    assert tuple(datamodule.std) == open_clip.OPENAI_DATASET_STD
    assert datamodule.tokenizer.context_length == 77


@pytest.mark.slow
def test_limoe_b32_trains_three_steps_on_cpu(tmp_path):
    """Three AdamW steps of the full-size LIMoE-B/32 (325M parameters) on 4 pairs of 224 px
    images and 77-token captions: finite losses and gradients, routing statistics logged."""
    cfg = compose(["model=limoe_b32", "data=shapes", "data.image_size=224",
                   "data.context_length=77", "data.batch_size=4", "trainer.max_steps=3",
                   "trainer.log_every_n_steps=1", "~callbacks", "trainer.enable_progress_bar=false",
                   "+trainer.enable_checkpointing=false", "+trainer.limit_val_batches=0"],
                  output_dir=tmp_path)  # fmt: skip
    torch.manual_seed(0)
    module = build_module(cfg)
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=build_datamodule(cfg))
    assert trainer.global_step == 3
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    steps = [r for r in rows if r.get("train/loss")]
    assert len(steps) == 3
    for row in steps:
        assert math.isfinite(float(row["train/loss"])) and float(row["train/loss"]) > 0
        assert 0 < float(row["train/grad_norm"]) < math.inf
        # Every expert's share of each MoE layer's image tokens; at capacity 1.0 what the
        # experts leave is dropped, logged as the mean over layers.
        kept = [sum(float(row[f"train/routing/layer{layer}/expert{e}/image"]) for e in range(8))
                for layer in range(1, 12, 2)]  # fmt: skip
        assert all(0 < k <= 1 + 1e-6 for k in kept)
        dropped = float(row["train/dropped/image"])
        assert dropped == pytest.approx(sum(1 - k for k in kept) / len(kept), abs=1e-4)
