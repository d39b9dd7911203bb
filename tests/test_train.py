"""Training end to end: Hydra compose + fast_dev_run, and the console scripts in a subprocess."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST_DEV_RUN

from limoe import cli
from limoe.lit import read_history
from limoe.train import build_datamodule, build_module, build_trainer, compose, train

BIN = Path(sys.executable).parent
TINY = [
    "experiment=smoke",
    "data.train_size=128",
    "data.val_size=32",
    "data.test_size=32",
    "data.novel_size=32",
    "data.eval_batch_size=32",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "callbacks.progress_bar.refresh_rate=1",
]


def test_compose_and_fast_dev_run_updates_weights(tmp_path):
    cfg = compose(["experiment=smoke", "trainer=cpu", *FAST_DEV_RUN], tmp_path)
    L.seed_everything(0)
    datamodule = build_datamodule(cfg)
    module, trainer = build_module(cfg, datamodule), build_trainer(cfg)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    changed = [n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("router" in n for n in changed) and any("experts.w1" in n for n in changed)
    assert "val/image_to_text_R@1" in trainer.callback_metrics
    first_moe = cfg.model.moe_layers[0]
    assert f"train/routing/layer{first_moe}/expert0/image" in trainer.callback_metrics


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny ``limoe-train`` in a subprocess; its run directory."""
    root = tmp_path_factory.mktemp("train")
    run_dir = root / "run"
    result = run([str(BIN / "limoe-train"), *TINY, f"hydra.run.dir={run_dir}"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_limoe_train_writes_the_run_directory(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    header = (trained_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/contrastive_loss", "train/aux_loss", "train/temperature",
            "train/dropped/image", "train/aux/local_entropy/text"} <= set(header)  # fmt: skip
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for prefix in ("test", "test_novel"):
        for task in ("colour", "shape", "position"):
            assert 0.0 <= metrics[f"{prefix}/{task}_zeroshot_top1"] <= 1.0
        for k in (1, 5, 10):
            assert 0.0 <= metrics[f"{prefix}/image_to_text_R@{k}"] <= 1.0
            assert 0.0 <= metrics[f"{prefix}/text_to_image_R@{k}"] <= 1.0
    assert metrics["train/steps"] == 4
    assert metrics["arm"] == "limoe" and metrics["config"]["trainer"]["max_steps"] == 4
    assert metrics["config"]["paths"]["output_dir"] == str(trained_run)


def test_limoe_eval_recomputes_the_same_metrics(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result = run([str(BIN / "limoe-eval"), f"ckpt={ckpt}", f"out={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((trained_run / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    test_keys = {k for k in trained if k.startswith("test")}
    assert test_keys | {"arm", "config"} == set(evaluated)  # the run's arm and config come along
    assert evaluated["arm"] == trained["arm"] and evaluated["config"] == trained["config"]
    for key in test_keys:
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key


def test_limoe_eval_into_the_run_directory_keeps_its_record(trained_run, tmp_path, console):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = json.loads((run_dir / "metrics.json").read_text())
    code, _, err = console(cli.evaluate, [f"ckpt={run_dir / 'checkpoints/last.ckpt'}"], tmp_path)
    assert code == 0, err[-3000:]
    after = json.loads((run_dir / "metrics.json").read_text())
    assert set(after) == set(before)  # training metrics, costs, arm and config kept
    assert after["train/steps"] == before["train/steps"] == 4
    for key in (k for k in before if k.startswith("test")):
        assert after[key] == pytest.approx(before[key], abs=1e-6), key


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.nope=1", "Could not override 'model.nope'"),
        ("model=nope", "Could not find 'model/nope'"),
        ("model.moe.router.top_k=9", "top_k must be in [1, num_experts=4], got 9"),
        ("data.batch_size=0", "batch_size"),
    ],
)
def test_bad_config_fails_with_one_line(override, message, tmp_path, console):
    code, _, err = console(cli.train, [*TINY, override, f"hydra.run.dir={tmp_path}"], tmp_path)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("limoe: error:")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err


ROUTING_FILES = {
    "summary.json", "experts.csv", "layers.csv", "content.csv", "history.csv",
    "expert_shares.png", "image_fraction.png", "specialisation.png", "routing_quality.png",
    "patch_routing.png", "word_routing.png", "content_routing.png", "over_training.png",
}  # fmt: skip


def test_routing_history_is_written_at_the_start_and_every_validation(trained_run):
    history = read_history(trained_run / "routing" / "history.jsonl")
    assert [record["step"] for record in history] == [0, 2, 4]  # start, val_check_interval=2
    assert set(history[-1]["layers"]) == {"0", "1", "2", "3"}  # the smoke arm's MoE blocks


def test_limoe_analyze_writes_every_figure_and_table(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result = run([str(BIN / "limoe-analyze"), f"ckpt={ckpt}", f"out={tmp_path}",
                  "num_pairs=20", "num_examples=3"], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert ROUTING_FILES <= {p.name for p in tmp_path.iterdir()}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_pairs"] == 20 and set(summary["layers"]) == {"0", "1", "2", "3"}
    for layer in summary["layers"].values():
        assert layer["tokens"]["image"] == 20 * 16  # 32 x 32 images in 8 x 8 patches
        assert sum(layer["specialised"].values()) == layer["num_experts"] == 4
    # history.csv: the last record's diagnostics for layer 2's image tokens, from history.jsonl.
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    row = [r for r in rows if r["layer"] == "2" and r["modality"] == "image"][-1]
    last = read_history(trained_run / "routing" / "history.jsonl")[-1]["layers"]["2"]
    assert float(row["switched"]) == pytest.approx(last["switched"]["image"], abs=1e-6)
    w2 = last["expert_norm"]["w2"]
    assert float(row["expert_w2_norm"]) == pytest.approx(sum(w2) / len(w2), rel=1e-5)
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if ": " in line)
    assert (
        float(printed["layer2/shared_experts"]) == summary["layers"]["2"]["specialised"]["shared"]
    )


def test_limoe_analyze_of_a_missing_checkpoint_fails_with_one_line(tmp_path, console):
    code, _, err = console(cli.analyze, [f"ckpt={tmp_path}/nope.ckpt"], tmp_path)
    assert code == 2
    assert err.strip() == f"limoe: error: ckpt={tmp_path}/nope.ckpt does not exist"


def test_routing_history_records_switching_norms_and_router_gradients(trained_run):
    history = read_history(trained_run / "routing" / "history.jsonl")
    first, last = history[0]["layers"]["2"], history[-1]["layers"]["2"]
    assert first["switched"] is None  # nothing to compare with at the start
    for share in last["switched"].values():
        assert 0.0 <= share <= 1.0
    # The norms are the checkpoint's own experts' and router's (the last record is the final
    # validation, and last.ckpt the final weights).
    state = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]  # fmt: skip
    w2 = state["model.blocks.2.mlp.experts.w2"]
    assert last["expert_norm"]["w2"] == pytest.approx(w2.flatten(1).norm(dim=1).tolist(), rel=1e-5)
    router = state["model.blocks.2.mlp.router.weight"]
    assert last["expert_norm"]["router"] == pytest.approx(float(router.norm()), rel=1e-5)
    header = (trained_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"router/layer{i}_grad_norm" for i in range(4)} <= set(header)


def test_a_seeded_short_run_beats_chance_by_a_margin(tmp_path):
    """60 steps of the smoke LIMoE on 256 test pairs: learning, not just running. Chance is a
    mean rank of 128.5, R@10 of 10 / 256 and, for the 4 backgrounds, top-1 of 0.25; on this
    seed the run reaches mean ranks near 30, R@10 near 0.2 and every background right."""
    cfg = compose(["experiment=smoke", "seed=0", "trainer.max_steps=60", "data.train_size=8192",
                   "data.batch_size=64", "data.test_size=256", "data.novel_size=64",
                   "trainer.val_check_interval=1000", "optim.warmup_steps=10",
                   "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
                   "callbacks.routing_history=null", "callbacks.last_checkpoint=null",
                   "callbacks.model_checkpoint=null"], tmp_path)  # fmt: skip
    metrics = train(cfg)
    for direction in ("image_to_text", "text_to_image"):
        assert metrics[f"test/{direction}_mean_rank"] < 128.5 / 2
        assert metrics[f"test/{direction}_R@10"] > 3 * 10 / 256
    assert metrics["test/background_zeroshot_top1"] > 0.9
