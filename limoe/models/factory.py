"""``create_model``: build a model by its config name (``limoe``, ``dense``, ``clip``) or from a
config."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf
from torch import nn

from limoe.config import compose_config, config_options
from limoe.models.build import build_model


def model_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/train.yaml`` with ``model=name`` and return its resolved ``model`` node."""
    known = config_options("model")
    if name not in known:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(known)}")
    cfg = compose_config("train", [f"model={name}", *(overrides or [])])
    return OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))


def create_model(
    name_or_cfg: str | Mapping, overrides: list[str] | None = None, **kwargs
) -> nn.Module:
    """Build a model from a config name, with Hydra-style ``overrides`` (``["model.depth=2"]``),
    or from a mapping that has a ``_target_``; ``kwargs`` override the config's arguments.
    Random weights, or a dense checkpoint's upcycled where the config has ``upcycle_from``."""
    cfg = model_config(name_or_cfg, overrides) if isinstance(name_or_cfg, str) else name_or_cfg
    return build_model(cfg, **kwargs)
