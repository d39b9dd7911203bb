"""The baseline arms and the comparison: cost counting by hand, one size config for all
arms, the comparison table from fake runs, and the smoke comparison end to end."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from hydra.utils import instantiate
from moe_helpers import bare_layer
from torch.utils.data import default_collate

from limoe.analysis.compare import (
    Run,
    compare,
    curve_keys,
    curves_figure,
    find_runs,
    group_by_arm,
    read_curves,
    summarise,
)
from limoe.analysis.compare import main as compare_main
from limoe.factory import build_model, create_model
from limoe.lit.callbacks import read_history, routing_metrics
from limoe.models import (
    LIMoE,
    build_clip,
    build_open_clip,
    model_cost,
    parameter_counts,
)
from limoe.models.cost import count_flops, flops_per_pair
from limoe.moe import TopKRouter
from limoe.runs import write_metrics
from limoe.train import compose, plain

BIN = Path(sys.executable).parent
SIZE = dict(embed_dim=8, image_size=8, patch_size=4, width=16, depth=2, num_heads=2,
            mlp_ratio=4.0, context_length=6)  # fmt: skip


def block_flops(n: int, width: int, hidden: int) -> int:
    """One pre-LN transformer block on n tokens: qkv, scores, weighted values, out-proj, MLP."""
    qkv = 2 * n * width * 3 * width
    attention = 2 * n * n * width * 2
    proj = 2 * n * width * width
    mlp = 2 * n * width * hidden * 2
    return qkv + attention + proj + mlp


def test_parameter_counts_leave_out_the_experts_a_token_does_not_use():
    moe = dict(num_experts=4, capacity_factor=None)
    model = LIMoE(**SIZE, moe_layers=[1], moe=moe)
    per_expert = 16 * 64 + 64 + 64 * 16 + 16  # w1, b1, w2, b2
    counts = parameter_counts(model)
    assert counts["params_total"] == sum(p.numel() for p in model.parameters())
    assert counts["params_total"] - counts["params_active_per_token"] == 3 * per_expert
    top2 = parameter_counts(
        LIMoE(**SIZE, moe_layers=[0, 1], moe={**moe, "router": partial(TopKRouter, top_k=2)})
    )
    assert top2["params_total"] - top2["params_active_per_token"] == 2 * 2 * per_expert


def test_moe_layer_flops_count_router_and_the_kept_tokens():
    torch.manual_seed(0)
    layer = bare_layer(dim=16, hidden=64, num_experts=4, top_k=2, capacity_factor=None)
    n = 10
    router = 2 * n * 16 * 4
    experts = 2 * (n * 2) * (16 * 64 + 64 * 16)  # dropless: every one of the 2n choices runs
    assert count_flops(layer, torch.randn(n, 16)) == router + experts


def test_dense_one_tower_flops_match_a_hand_count():
    model = LIMoE(**SIZE, moe_layers=[])
    images, tokens = torch.randn(3, 3, 8, 8), torch.randint(1, 100, (3, 6))
    patches, width, hidden = 4, 16, 64
    patch_embed = 2 * patches * (3 * 4 * 4) * width
    blocks = 2 * (block_flops(patches, width, hidden) + block_flops(6, width, hidden))
    heads = 2 * (2 * width * 8)  # image and text projections
    assert flops_per_pair(model, images, tokens) == patch_embed + blocks + heads


def test_clip_flops_match_a_hand_count_with_class_token_and_causal_text():
    model = build_clip(**SIZE)
    images, tokens = torch.randn(3, 3, 8, 8), torch.randint(1, 100, (3, 6))
    patches, width, hidden = 4, 16, 64
    patch_embed = 2 * patches * (3 * 4 * 4) * width
    vision = 2 * block_flops(patches + 1, width, hidden)  # + class token
    text = 2 * block_flops(6, width, hidden)  # every position, padded or not
    heads = 2 * (2 * width * 8)
    assert flops_per_pair(model, images, tokens) == patch_embed + vision + text + heads


def test_flop_count_leaves_the_model_mode_and_random_stream_alone():
    model = LIMoE(
        **SIZE,
        moe_layers=[1],
        moe=dict(num_experts=4, router=partial(TopKRouter, noisy_gating=True)),
    ).train()
    images, tokens = torch.randn(2, 3, 8, 8), torch.randint(1, 100, (2, 6))
    torch.manual_seed(0)
    model_cost(model, images, tokens)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert model.training and torch.equal(after, torch.rand(1))


def test_the_three_arms_build_from_one_size_config():
    overrides = ["data=shapes", "model.width=32", "model.depth=2", "model.num_heads=2",
                 "model.embed_dim=16", "model.patch_size=4", "model.moe_layers=[1]"]  # fmt: skip
    limoe = create_model("limoe", overrides)
    dense = create_model("dense", overrides[:-1])
    clip = create_model("clip", overrides[:-1])
    assert limoe.moe_layers == [1] and dense.moe_layers == []
    for model in (limoe, dense):
        assert len(model.blocks) == 2 and model.blocks[0].attn.num_heads == 2
        assert model.patch_embed.patch_size == (4, 4) and model.image_proj.out_features == 16
    for tower in (clip.visual.transformer, clip.transformer):
        assert tower.width == 32 and len(tower.resblocks) == 2
        assert tower.resblocks[0].attn.num_heads == 2
    assert clip.visual.conv1.kernel_size == (4, 4) and clip.visual.output_dim == 16
    assert clip.context_length == limoe.context_length == 24
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 24))
    for model in (limoe, dense, clip):
        assert model.encode_image(images).shape == model.encode_text(tokens).shape == (2, 16)


def test_default_limoe_costs_within_ten_percent_of_clip_whatever_the_router_learns(train_cfg):
    """The issue's matched-compute condition, on the default configs and real val pairs. The
    default MoE layers are dropless, so every routed token runs through exactly one expert and
    the count cannot move with training: scrambling the routers leaves it unchanged."""
    val = instantiate(train_cfg.data).dataset("val")
    images, tokens, _ = default_collate([val[i] for i in range(64)])
    torch.manual_seed(0)
    limoe, clip = create_model("limoe"), create_model("clip")
    assert limoe.moe_layers and all(limoe.blocks[i].mlp.capacity_factor is None
                                    for i in limoe.moe_layers)  # fmt: skip
    limoe_flops = flops_per_pair(limoe, images, tokens)
    assert 0.9 <= limoe_flops / flops_per_pair(clip, images, tokens) <= 1.1
    for i in limoe.moe_layers:
        torch.nn.init.normal_(limoe.blocks[i].mlp.router.weight, std=10.0)
    assert flops_per_pair(limoe, images, tokens) == limoe_flops


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text_pool": "mean"}, "model.text_pool='mean' is not available for model=clip"),
        ({"image_pos_embed": "rope"}, "model.image_pos_embed='rope'"),
    ],
)
def test_clip_arm_rejects_what_open_clip_cannot_build(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_clip(**SIZE, **kwargs)


def test_clip_arm_takes_only_what_clip_uses():
    for limoe_only in ("drop_path_rate", "weight_init", "modality_norms"):
        with pytest.raises(TypeError, match=limoe_only):
            build_clip(**SIZE, **{limoe_only: None})


@pytest.mark.parametrize(
    ("preset", "name"),
    [("clip_b32", "ViT-B-32"), ("clip_b16", "ViT-B-16"), ("clip_l14", "ViT-L-14")],
)
def test_paper_clip_presets_are_open_clips_own_models(preset, name, tmp_path):
    cfg = compose([f"model={preset}", "data=csv", "data.image_size=224",
                   "data.context_length=77"], output_dir=tmp_path)  # fmt: skip
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        ours = build_model(plain(cfg.model))
    theirs = open_clip.create_model(name, device="meta")
    shapes = {key: p.shape for key, p in ours.named_parameters()}
    assert shapes == {key: p.shape for key, p in theirs.named_parameters()}
    assert type(ours) is type(theirs) and ours.output_dict
    # The data's sizes replace the config's: 112 px at patch 16 is 7 x 7 positions + class.
    with torch.device("meta"):
        small = build_model(plain(compose([f"model={preset}", "data=csv", "data.image_size=112",
                                           "data.context_length=16"], output_dir=tmp_path).model))  # fmt: skip
    patch = theirs.visual.patch_size[0]
    assert small.visual.positional_embedding.shape[0] == (112 // patch) ** 2 + 1
    assert small.positional_embedding.shape[0] == 16


def test_paper_clip_preset_names_a_missing_open_clip_config():
    with pytest.raises(ValueError, match="model.name='ViT-X-99' is not an open_clip model"):
        build_open_clip("ViT-X-99")


def fake_run(root: Path, name: str, arm: str, seed: int, metrics: dict, val: list) -> Path:
    """A run directory as ``limoe-train`` writes it: metrics.json (arm, metrics, config) and the
    CSV log, and nothing else."""
    run = root / name
    write_metrics(run / "metrics.json", metrics, arm, {"seed": seed, "data": {"batch_size": 4}})
    rows = ["step,train/loss,val/image_to_text_R@1,val/shape_zeroshot_top1", "0,2.0,,"]
    rows += [f"{step},,{r1},{shape}" for step, r1, shape in val]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run


def test_comparison_table_gives_mean_and_std_over_seeds(tmp_path):
    cost = {"model/flops_per_pair": 1e6}
    fake_run(tmp_path, "a", "limoe", 0, {"test/image_to_text_R@1": 0.5, **cost},
             [(9, 0.2, 0.1), (19, 0.4, 0.3)])  # fmt: skip
    fake_run(tmp_path, "b", "limoe", 1, {"test/image_to_text_R@1": 0.7, **cost},
             [(9, 0.4, 0.3), (19, 0.6, 0.5)])  # fmt: skip
    fake_run(tmp_path, "c", "clip", 0, {"test/image_to_text_R@1": 0.6, **cost}, [(9, 0.1, 0.2)])
    groups = group_by_arm(find_runs([tmp_path]))
    assert list(groups) == ["limoe", "clip"]
    rows = {(r["arm"], r["metric"]): r for r in summarise(groups)}
    r1 = rows[("limoe", "test/image_to_text_R@1")]
    assert r1["mean"] == pytest.approx(0.6) and r1["n"] == 2
    assert r1["std"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.5 and 0.7
    assert rows[("clip", "test/image_to_text_R@1")]["std"] == 0.0

    files = compare([tmp_path], tmp_path / "out")
    table = files["comparison.md"].read_text()
    assert "| metric | limoe (n=2) | clip (n=1) |" in table
    assert "| `test/image_to_text_R@1` | 0.600 ± 0.141 | 0.600 ± 0.000 |" in table
    csv_lines = files["comparison.csv"].read_text().splitlines()
    assert csv_lines[0] == "arm,metric,mean,std,n" and len(csv_lines) == 1 + 4
    for png in ("curves_step.png", "curves_flops.png"):
        assert files[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_routing_metrics_by_hand():
    """Two layers of four experts: kinds counted, the busiest share per modality and layer,
    and the largest over layers as the collapse figure."""

    def summary(image_share, text_share, kinds):
        return {
            "share": {"image": image_share, "text": text_share},
            "specialised": dict(zip(("image", "text", "shared", "unused"), kinds)),
            "entropy_global": {"image": 1.2, "text": 0.4},
            "entropy_local": {"image": 0.5, "text": 0.1},
            "dropped": {"image": 0.0, "text": 0.25},
        }

    metrics = routing_metrics({
        "2": summary([0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6], (1, 1, 2, 0)),
        "3": summary([0.25, 0.25, 0.25, 0.25], [0.0, 0.9, 0.1, 0.0], (0, 1, 1, 2)),
    })  # fmt: skip
    assert metrics["routing/layer2/image_busiest_share"] == 0.4
    assert metrics["routing/layer3/text_busiest_share"] == 0.9
    assert metrics["routing/text_busiest_share"] == 0.9
    assert metrics["routing/image_busiest_share"] == 0.4
    assert metrics["routing/layer3/unused_experts"] == 2.0
    assert metrics["routing/layer2/text_dropped"] == 0.25
    assert len(metrics) == 2 * (4 + 2 * 4) + 2


def test_curves_are_the_validation_metrics_or_else_the_training_loss(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,train/contrastive_loss,val/image_to_text_R@1,val/x_zeroshot_top5\n"
                    "24,4.5,,\n49,4.0,,\n49,,0.25,0.5\n")  # fmt: skip
    curves = read_curves(path)
    assert curves == {"train/contrastive_loss": [(24, 4.5), (49, 4.0)],
                      "val/image_to_text_R@1": [(49, 0.25)], "val/x_zeroshot_top5": [(49, 0.5)]}  # fmt: skip
    validated = {"limoe": [Run("limoe", 8, {}, curves)]}
    assert curve_keys(validated) == ["val/image_to_text_R@1"]
    trained_only = {"limoe": [Run("limoe", 8, {}, {"train/contrastive_loss": [(24, 4.5)]})]}
    assert curve_keys(trained_only) == ["train/contrastive_loss"]


def test_compare_without_runs_fails_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        compare_main([str(tmp_path)])
    assert stop.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"limoe-compare: error: no run with a metrics.json under {tmp_path}"
    )


def test_smoke_comparison_runs_every_arm_end_to_end(tmp_path):
    train = subprocess.run(
        [str(BIN / "limoe-train"), "-m", "experiment=limoe_vs_clip_smoke",
         f"paths.log_dir={tmp_path}", "callbacks.progress_bar.refresh_rate=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    (sweep,) = (tmp_path / "limoe_vs_clip_smoke" / "multiruns").iterdir()
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == [f"{arm}_seed{s}_job{j}" for arm, s, j in
                    [("clip", 0, 6), ("clip", 1, 7), ("dense", 0, 2), ("dense", 1, 3),
                     ("limoe", 0, 0), ("limoe", 1, 1), ("multiway", 0, 4), ("multiway", 1, 5)]]  # fmt: skip
    result = subprocess.run([str(BIN / "limoe-compare"), str(sweep), "--out", str(tmp_path / "cmp")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| metric | limoe (n=2) | dense (n=2) | multiway (n=2) | clip (n=2) |" in table
    assert "`model/flops_per_pair`" in table and "`test/shape_zeroshot_top1`" in table
    csv_arms = {
        line.split(",")[0]
        for line in (tmp_path / "cmp" / "comparison.csv").read_text().splitlines()[1:]
    }
    assert csv_arms == {"limoe", "dense", "multiway", "clip"}
    for png in ("curves_step.png", "curves_flops.png", "expert_shares.png", "collapse.png"):
        assert (tmp_path / "cmp" / png).is_file()  # the limoe runs recorded their routing
    # What the curves draw: each arm's line is the mean over its seeds of the values its
    # runs' metrics.csv hold, read here with the csv module.
    groups = group_by_arm(find_runs([sweep]))
    figure = curves_figure(groups, "step")
    key = "val/image_to_text_R@1"
    (ax,) = [ax for ax in figure.axes if ax.get_title() == key]
    for line in ax.get_lines():
        arm = line.get_label().split(" (n=")[0]
        values = defaultdict(list)
        for run_dir in sweep.glob(f"{arm}_seed*"):
            for row in csv.DictReader((run_dir / "metrics.csv").open()):
                if row.get(key):
                    values[int(row["step"])].append(float(row[key]))
        steps = sorted(values)
        assert line.get_xdata().tolist() == steps
        assert line.get_ydata() == pytest.approx([np.mean(values[s]) for s in steps])
    run_dir = next(sweep.glob("limoe_seed0_*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = read_history(run_dir / "routing" / "history.jsonl")[-1]
    assert last["step"] == metrics["train/steps"]
    for layer in ("0", "1", "2", "3"):
        share = last["layers"][layer]["share"]["text"]
        assert metrics[f"routing/layer{layer}/text_busiest_share"] == max(share)
        kinds = [metrics[f"routing/layer{layer}/{k}_experts"] for k in ("image", "text",
                 "shared", "unused")]  # fmt: skip
        assert sum(kinds) == 4  # experts in the smoke size
    assert metrics["arm"] == "limoe" and metrics["config"]["model"]["moe_layers"] == [0, 1, 2, 3]
    assert metrics["config"]["seed"] == 0 and metrics["config"]["arm"] == "limoe"
    assert metrics["model/params_active_per_token"] < metrics["model/params_total"]
    assert metrics["model/flops_per_pair"] > 0 and metrics["train/samples_per_second"] > 0
