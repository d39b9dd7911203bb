"""Where limoe's Hydra configs are, and composing them outside a Hydra app.

The configs are the package ``limoe.conf`` (``conf/`` in the repository, mapped by
``setup.py``), so an editable install, a wheel and a checkout all find them the same way,
from any working directory: Hydra apps through ``pkg://limoe.conf``, the compose API through
``initialize_config_module``, listings through ``importlib.resources``.
"""

from __future__ import annotations

import contextlib
from importlib.resources import files

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

CONFIG_MODULE = "limoe.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # for hydra.main


def config_options(group: str) -> list[str]:
    """The configs of one group, e.g. ``config_options("model") == ["clip", "dense", ...]``."""
    folder = files(CONFIG_MODULE).joinpath(group)
    if not folder.is_dir():
        return []
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def _initialised() -> contextlib.AbstractContextManager:
    """Hydra initialised on the configs; inside a running Hydra app (``limoe-bench`` composes
    training configs) it already is, on the same search path."""
    if GlobalHydra.instance().is_initialized():
        return contextlib.nullcontext()
    return initialize_config_module(CONFIG_MODULE, version_base="1.3")


def compose_config(
    name: str, overrides: list[str] | None = None, return_hydra_config: bool = False
) -> DictConfig:
    """Compose the primary config ``name`` (``train``, ``eval``, ...) with ``key=value``
    overrides, as the console script of that name would."""
    with _initialised():
        return compose(
            name, overrides=list(overrides or []), return_hydra_config=return_hydra_config
        )
