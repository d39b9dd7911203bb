"""More than one process: 2 CPU processes under ``trainer=ddp`` compute the same loss,
gradients and evaluation metrics as one process on the same global batch, with the experts
replicated (data parallel) or split between the processes (``model.moe.expert_parallel``)."""

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
    "experiment=smoke", "trainer.max_steps=1", "model.moe.router.noisy_gating=false",
    "model.moe.losses.importance_weight=0", "model.moe.losses.load_weight=0", "model.moe.losses.vmoe_load_weight=0",
    "model.moe.losses.local_entropy_weight=0",
    "model.moe.losses.global_entropy_weight=0", "data.val_size=37", "data.eval_batch_size=8",
    # Auxiliary-loss-free balancing: its bias starts at 0 (the first step's math is the same)
    # and the step moves it from the counts of every process (checked below).
    "model.moe.router.balance=bias", "model.moe.router.bias_per_modality=true",
]  # fmt: skip


def one_step(out: Path, overrides: list[str]) -> list[dict]:
    out.mkdir()
    cmd = [sys.executable, str(SCRIPTS / "one_step.py"), str(out), *SAME_MATH, *overrides]
    result = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(path) for path in sorted(out.glob("rank*.pt"))]


TWO_PROCESSES = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=8"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def single(root) -> list[dict]:
    return one_step(root / "single", ["trainer=cpu", "data.batch_size=16"])


@pytest.fixture(scope="module")
def runs(root, single) -> tuple[list[dict], list[dict]]:
    return single, one_step(root / "ddp", TWO_PROCESSES)


@pytest.fixture(scope="module")
def expert_parallel(root, single) -> tuple[list[dict], list[dict]]:
    return single, one_step(root / "ep", [*TWO_PROCESSES, "model.moe.expert_parallel=true"])


@pytest.fixture(scope="module")
def siglip(root) -> tuple[list[dict], list[dict]]:
    return (one_step(root / "siglip_single", ["trainer=cpu", "data.batch_size=16", "loss=siglip"]),
            one_step(root / "siglip_ddp", [*TWO_PROCESSES, "loss=siglip"]))  # fmt: skip


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


def test_two_processes_move_the_expert_bias_as_one_process(runs, expert_parallel, root):
    """The bias update sums every process's counts (one all-reduce): data-parallel and
    expert-parallel runs move each router's bias exactly as one process with the whole batch."""
    one = torch.load(root / "single/last.ckpt", weights_only=False)["state_dict"]
    biases = [name for name in one if name.endswith("router.expert_bias")]
    assert len(biases) == 4 and all(one[name].shape == (2, 4) for name in biases)
    for run in ("ddp", "ep"):
        other = torch.load(root / run / "last.ckpt", weights_only=False)["state_dict"]
        for name in biases:
            assert one[name].abs().sum() > 0, name
            assert torch.equal(other[name], one[name]), (run, name)


def test_siglip_over_two_processes_gives_the_single_process_loss_and_gradients(siglip):
    """open_clip's SigLipLoss passes the captions round the processes: each rank scores its
    images against all captions, over its own batch size, so the mean over the ranks is the
    whole batch's loss and DDP's mean gradient its gradient."""
    single, ddp = siglip
    local = [r["local_loss"] for r in ddp]
    assert sum(local) / 2 == pytest.approx(single[0]["local_loss"], rel=1e-5)
    assert local[0] != pytest.approx(local[1], rel=1e-3)
    reference = single[0]["grads"]
    assert "logit_bias" in reference
    for rank in ddp:
        assert rank["logged_loss"] == pytest.approx(single[0]["logged_loss"], rel=1e-5)
        for name, grad in rank["grads"].items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_evaluation_over_uneven_shards_equals_one_process(runs):
    """37 val pairs over 2 ranks: DDP's sampler repeats one; the metrics count it once."""
    single, ddp = runs
    assert set(single[0]["val"]) == set(ddp[0]["val"])
    for r in ddp:
        for key, value in single[0]["val"].items():
            assert r["val"][key] == pytest.approx(value, abs=1e-6), key


EXPERT_WEIGHTS = ("w1", "b1", "w2", "b2")


def is_expert(name: str) -> bool:
    return ".experts." in name and name.rsplit(".", 1)[1] in EXPERT_WEIGHTS


def test_expert_parallel_gives_the_single_process_loss_and_gradients(expert_parallel):
    """Each rank holds half the experts; its expert gradients are its block of the
    single-process ones, the replicated weights' gradients are the same everywhere."""
    single, ep = expert_parallel
    reference = single[0]["grads"]
    for rank, run in enumerate(ep):
        assert run["logged_loss"] == pytest.approx(single[0]["logged_loss"], rel=1e-5)
        assert run["grads"].keys() == reference.keys()
        for name, grad in run["grads"].items():
            expected = reference[name]
            if is_expert(name):
                half = expected.shape[0] // 2
                assert grad.shape[0] == half
                expected = expected[rank * half : (rank + 1) * half]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)
    for r in ep:
        for key, value in single[0]["val"].items():
            assert r["val"][key] == pytest.approx(value, abs=1e-6), key


def test_expert_parallel_checkpoint_holds_every_expert_and_loads_on_one_process(
    expert_parallel, root
):
    from limoe.lit import ContrastiveModule

    ep_ckpt = torch.load(root / "ep/last.ckpt", weights_only=False)
    one_ckpt = torch.load(root / "single/last.ckpt", weights_only=False)
    for name, value in one_ckpt["state_dict"].items():
        assert ep_ckpt["state_dict"][name].shape == value.shape, name
    # AdamW's first moment after one step is (1 - beta1) * gradient: gathered from both ranks,
    # it matches the single process's for every expert.
    ep_state = ep_ckpt["optimizer_states"][0]["state"]
    one_state = one_ckpt["optimizer_states"][0]["state"]
    assert ep_state.keys() == one_state.keys()
    for i in one_state:
        torch.testing.assert_close(ep_state[i]["exp_avg"], one_state[i]["exp_avg"],
                                   rtol=1e-3, atol=1e-7)  # fmt: skip
    module = ContrastiveModule.load_from_checkpoint(root / "ep/last.ckpt")
    experts = [m for n, m in module.model.named_modules() if n.endswith("mlp.experts")]
    assert experts and all(m.w1.shape[0] == 4 and m.parallel is None for m in experts)
