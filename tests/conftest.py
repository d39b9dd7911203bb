"""Shared fixtures: the real Hydra configs, composed with tiny sizes and paths in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from limoe.cli import compose_config

# Two cores: more threads than that only contend (the suite runs under CI's 2 CPUs).
torch.set_num_threads(min(2, torch.get_num_threads()))


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    return compose_config(overrides)


@pytest.fixture
def train_cfg() -> DictConfig:
    """``conf/train.yaml`` as ``limoe-train`` composes it with no overrides."""
    return compose_train()


@pytest.fixture
def smoke_cfg(tmp_path: Path) -> DictConfig:
    """``conf/train.yaml`` + ``experiment=smoke``, writing into ``tmp_path``, on CPU."""
    cfg = compose_train(["experiment=smoke", "trainer=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path / "logs")
    return cfg


# `experiment=smoke` sizes the shapes splits; these keys go for the file datamodules.
SHAPES_ONLY_KEYS = (
    "train_size",
    "val_size",
    "test_size",
    "novel_size",
    "partial_captions_from_step",
)
FILES_SMOKE = ["experiment=smoke", *(f"~data.{key}" for key in SHAPES_ONLY_KEYS)]
