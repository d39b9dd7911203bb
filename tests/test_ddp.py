"""More than one process: 2 CPU processes under ``trainer=ddp`` compute the same loss,
gradients and evaluation metrics as one process on the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"
# Per-sample independent forward: dropless routing, no gating noise, no auxiliary losses
# (those are statistics of each process's own batch, as the paper computes them per device).
SAME_MATH = [
    "experiment=smoke", "trainer.max_steps=1", "model.moe.noisy_gating=false",
    "model.moe.load_weight=0", "model.moe.local_entropy_weight=0",
    "model.moe.global_entropy_weight=0", "data.val_size=37", "data.eval_batch_size=8",
]  # fmt: skip


def one_step(out: Path, overrides: list[str]) -> list[dict]:
    out.mkdir()
    cmd = [sys.executable, str(SCRIPTS / "one_step.py"), str(out), *SAME_MATH, *overrides]
    result = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(path) for path in sorted(out.glob("rank*.pt"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    root = tmp_path_factory.mktemp("ddp")
    single = one_step(root / "single", ["trainer=cpu", "data.batch_size=16"])
    ddp = one_step(root / "ddp", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                  "data.batch_size=8"])  # fmt: skip
    return single, ddp


def test_two_processes_see_half_the_global_batch_each(runs):
    single, ddp = runs
    assert len(single) == 1 and len(ddp) == 2
    assert single[0]["batch_size"] == 16 and [r["batch_size"] for r in ddp] == [8, 8]


def test_two_processes_give_the_single_process_loss(runs):
    single, ddp = runs
    # ClipLoss(local_loss, gather_with_grad): each rank's rows against all columns; the mean
    # over ranks is the full batch's loss, which both ranks log.
    local = [r["local_loss"] for r in ddp]
    assert sum(local) / 2 == pytest.approx(single[0]["local_loss"], rel=1e-5)
    assert local[0] != pytest.approx(local[1], rel=1e-3)  # each rank has its own rows
    for r in ddp:
        assert r["logged_loss"] == pytest.approx(single[0]["logged_loss"], rel=1e-5)


def test_two_processes_give_the_single_process_gradients(runs):
    single, ddp = runs
    reference = single[0]["grads"]
    for rank in ddp:
        assert rank["grads"].keys() == reference.keys()
        for name, grad in rank["grads"].items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any("experts.w1" in name and reference[name].abs().sum() > 0 for name in reference)


def test_evaluation_over_uneven_shards_equals_one_process(runs):
    """37 val pairs over 2 ranks: DDP's sampler repeats one; the metrics count it once."""
    single, ddp = runs
    assert set(single[0]["val"]) == set(ddp[0]["val"])
    for r in ddp:
        for key, value in single[0]["val"].items():
            assert r["val"][key] == pytest.approx(value, abs=1e-6), key
