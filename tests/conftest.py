"""Shared fixtures: the real Hydra configs, composed with tiny sizes and paths in tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from limoe.train import compose

# Two cores: more threads than that only contend (the suite runs under CI's 2 CPUs).
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--device", default="cpu",
        help="where the tests that take the `device` fixture run: cpu (CI), or cuda on a GPU "
        "machine (scripts/gpu_check.sh), which takes the CUDA branches (bf16 grouped GEMM, "
        "fused AdamW, uint8 batches normalised on the GPU)",
    )  # fmt: skip


@pytest.fixture
def device(request) -> torch.device:
    """The ``--device`` the suite was started with; the test is skipped if it has none."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda, but torch sees no CUDA GPU")
    return device


# One training step and one validation batch, without the configured callbacks and loggers.
FAST_DEV_RUN = ["+trainer.fast_dev_run=true", "~callbacks", "~logger",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]  # fmt: skip


@pytest.fixture
def train_cfg() -> DictConfig:
    """``conf/train.yaml`` as ``limoe-train`` composes it with no overrides."""
    return compose()


@pytest.fixture
def smoke_cfg(tmp_path: Path) -> DictConfig:
    """``conf/train.yaml`` + ``experiment=smoke``, writing into ``tmp_path``, on CPU."""
    return compose(["experiment=smoke", "trainer=cpu", f"paths.log_dir={tmp_path / 'logs'}"],
                   output_dir=tmp_path)  # fmt: skip


# `experiment=smoke` sizes the shapes splits; these keys go for the file datamodules.
SHAPES_ONLY_KEYS = (
    "train_size",
    "val_size",
    "test_size",
    "novel_size",
    "partial_captions_from_step",
)
FILES_SMOKE = ["experiment=smoke", *(f"~data.{key}" for key in SHAPES_ONLY_KEYS)]


@pytest.fixture
def console(monkeypatch, capsys):
    """Run a console entry point (``limoe.cli.train``, ...) in this process, as the script
    would with ``argv``, from ``cwd``: ``(exit status, stdout, stderr)``. The scripts
    themselves run once each in a subprocess elsewhere; this skips the interpreter start and
    imports (about 10 s on CI's cores) for the many cases of one script."""

    def run(entry, argv: list[str], cwd: Path) -> tuple[int, str, str]:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["limoe", *argv])
        capsys.readouterr()
        try:
            entry()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run
