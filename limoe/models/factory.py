"""``create_model``: build a model by its config name (``limoe``, ``dense``, ``clip``) or from a
config."""

from __future__ import annotations

from collections.abc import Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from limoe.config import compose_config, config_options
from limoe.models.upcycle import pop_upcycle


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
    or from a mapping that has a ``_target_``; ``kwargs`` override the config's arguments."""
    cfg = model_config(name_or_cfg, overrides) if isinstance(name_or_cfg, str) else name_or_cfg
    if "_target_" not in cfg:
        raise ValueError(f"a model config needs a _target_, got keys {sorted(cfg)}")
    cfg, upcycle_from = pop_upcycle(cfg)
    if upcycle_from:
        raise ValueError(
            "model.upcycle_from is read where checkpoints are: limoe-train or "
            "limoe.create_model_and_transforms (or call limoe.models.upcycle on a built model)"
        )
    return instantiate(cfg, **kwargs, _convert_="all")
