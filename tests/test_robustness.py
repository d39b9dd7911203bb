"""Robustness: a killed run resumed from last.ckpt ends where an uninterrupted one does; a
non-finite loss stops the run with one line naming the step and keeps the good checkpoint."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from limoe.factory import export_model

BIN = Path(sys.executable).parent
SCRIPTS = Path(__file__).parent / "scripts"
RUN = [
    "experiment=smoke", "data.train_size=256", "data.val_size=32", "data.test_size=32",
    "data.novel_size=32", "data.eval_batch_size=32", "trainer.max_steps=6",
    "trainer.val_check_interval=3", "trainer.deterministic=true",
    "callbacks.last_checkpoint.every_n_train_steps=2", "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]  # fmt: skip


def limoe_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS)}
    cmd = [str(BIN / "limoe-train"), *RUN, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=600,
                          env=env)  # fmt: skip


def logged_steps(metrics_csv: Path) -> set[int]:
    """The steps of the rows the CSV logger wrote."""
    with metrics_csv.open(newline="") as f:
        return {int(row["step"]) for row in csv.DictReader(f) if row["step"]}


# Two gloo processes with the experts split between them: each rank's random stream, data
# shard and block of expert optimiser state must come back; and the expert bias of
# auxiliary-loss-free balancing, moved after every step from both processes' counts.
EXPERT_PARALLEL = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                   "data.batch_size=16", "model.moe.expert_parallel=true",
                   "model.moe.router.balance=bias"]  # fmt: skip


@pytest.mark.parametrize("processes", [[], EXPERT_PARALLEL],
                         ids=["one-process", "ddp-experts-bias"])  # fmt: skip
def test_a_killed_run_resumed_from_last_ckpt_ends_as_an_uninterrupted_one(processes, tmp_path):
    whole = limoe_train(tmp_path / "whole", *processes)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = limoe_train(tmp_path / "killed", *processes,
                         "+callbacks.crash._target_=faults.CrashAt", "+callbacks.crash.step=4")  # fmt: skip
    assert killed.returncode == 9 and not (tmp_path / "killed/metrics.json").exists()
    last = tmp_path / "killed/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    resumed = limoe_train(tmp_path / "resumed", *processes, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert min(logged_steps(tmp_path / "resumed/metrics.csv")) >= 4  # nothing re-trained from 0
    expected = json.loads((tmp_path / "whole/metrics.json").read_text())
    got = json.loads((tmp_path / "resumed/metrics.json").read_text())
    tested = [k for k in expected if k.startswith("test")]
    assert len(tested) > 20
    for key in tested:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    weights = [torch.load(tmp_path / f"{run}/checkpoints/last.ckpt", weights_only=False)
               ["state_dict"] for run in ("whole", "resumed")]  # fmt: skip
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=1e-6, msg=name)
    if "model.moe.router.balance=bias" in processes:  # the bias came back and moved on
        bias = [n for n in weights[0] if n.endswith("expert_bias")]
        assert bias and all(weights[1][n].abs().sum() > 0 for n in bias)
    # The checkpoint holds every expert, however many processes held them: it exports whole.
    exported = load_file(export_model(tmp_path / "whole/checkpoints/last.ckpt", tmp_path / "e")
                         / "model.safetensors")  # fmt: skip
    model_weights = {k.removeprefix("model."): v for k, v in weights[0].items()}
    assert exported.keys() == model_weights.keys()
    for name, value in exported.items():
        assert torch.equal(value, model_weights[name]), name
    assert exported["blocks.2.mlp.experts.w1"].shape[0] == 4  # experiment=smoke: 4 experts


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    result = limoe_train(tmp_path / "run", "+callbacks.poison._target_=faults.PoisonAt",
                         "+callbacks.poison.step=3")  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("limoe: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "non-finite" in errors[0] and "at step " in errors[0]
    assert "last good checkpoint is" in errors[0] and "Traceback" not in result.stderr
    assert "non-finite loss nan at step 3;" in errors[0]
    last = Path(errors[0].split("last good checkpoint is ")[1].split(" (")[0])
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 3  # the best checkpoint, saved at step 3's validation
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
