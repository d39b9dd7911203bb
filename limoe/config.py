"""Where limoe's Hydra configs are, and composing them outside a Hydra app.

The configs are the package ``limoe.conf`` (``conf/`` in the repository, mapped by
``setup.py``), so an editable install and a wheel find them the same way, from any working
directory: Hydra apps through ``pkg://limoe.conf``, the compose API through
``initialize_config_module``, listings through ``importlib.resources``. A checkout run from
``PYTHONPATH`` with no install (as on a machine with its own torch) has no such package: there
the same three read the ``conf/`` folder beside the package.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from importlib.resources import files
from pathlib import Path, PurePath

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_MODULE = "limoe.conf"
INSTALLED = importlib.util.find_spec(CONFIG_MODULE) is not None
# The configs' folder, and where hydra.main searches them.
CONFIG_DIR = files(CONFIG_MODULE) if INSTALLED else Path(__file__).resolve().parent.parent / "conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}" if INSTALLED else str(CONFIG_DIR)
# Nodes without a _target_ that are the keyword arguments of a constructor (or of several:
# ``model.moe`` feeds ``moe_mlp``, which passes the rest on to ``MoELayer``): their values are
# checked against its annotations.
KEYWORDS_OF = {
    "model.moe": ("limoe.models.limoe.moe_mlp", "limoe.moe.MoELayer"),
    "data.augment": "open_clip.transform.AugmentationCfg",
}


# Keys of ``model.moe`` that moved into the node of the part they configure (the router, the
# experts, the losses): the old name -> the new one, under ``model.moe``. An override of an
# old key fails naming the new one; a stored config (a checkpoint's, an export's) is upgraded.
MOVED_MOE_KEYS = {
    **{key: f"router.{key}" for key in ("top_k", "batch_priority", "renormalize_gates",
                                         "noisy_gating", "capacity_multiple", "slots_per_expert")},
    "router_init_std": "router.init_std",
    "drop": "experts.drop",
    "gemm": "experts.gemm",
    **{key: f"losses.{key}" for key in ("importance_weight", "load_weight", "vmoe_load_weight",
                                         "z_loss_weight", "local_entropy_weight",
                                         "global_entropy_weight", "global_entropy_min_experts")},
    "loss_scope": "losses.scope",
}  # fmt: skip


def check_moved_keys(overrides: Sequence[str]) -> None:
    """One line naming the new key, for an override of a ``model.moe`` key that moved."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        old = key.removeprefix("model.moe.")
        if key == "model.moe.router" and "=" in override:
            name = override.split("=", 1)[1]
            raise ValueError(
                f"{override}: a router is chosen as a config group now, "
                f"router@model.moe.router={name} (one of {', '.join(config_options('router'))})"
            )
        if key.startswith("model.moe.") and old in MOVED_MOE_KEYS:
            raise ValueError(f"{key} is now model.moe.{MOVED_MOE_KEYS[old]}")


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type, named with its key and the type it needs."""


def config_options(group: str) -> list[str]:
    """The configs of one group, e.g. ``config_options("model") == ["clip", "dense", ...]``."""
    folder = CONFIG_DIR.joinpath(group)
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
    if INSTALLED:
        return initialize_config_module(CONFIG_MODULE, version_base="1.3")
    return initialize_config_dir(str(CONFIG_DIR), version_base="1.3")


def check_app_config(cfg: DictConfig, name: str) -> None:
    """Inside a Hydra app, on the config it composed: ``compose_config``'s type check of the
    command line's value overrides (``check_types``)."""
    with _initialised():
        check_override_types(cfg, name, list(HydraConfig.get().overrides.task))


def compose_config(
    name: str, overrides: list[str] | None = None, return_hydra_config: bool = False
) -> DictConfig:
    """Compose the primary config ``name`` (``train``, ``eval``, ...) with ``key=value``
    overrides, as the console script of that name would."""
    overrides = list(overrides or [])
    check_moved_keys(overrides)
    with _initialised():
        cfg = compose(name, overrides=overrides, return_hydra_config=return_hydra_config)
        check_override_types(cfg, name, overrides)
    return cfg


def check_override_types(cfg: DictConfig, name: str, overrides: Sequence[str]) -> None:
    """``check_types`` of ``cfg`` (config ``name`` composed with ``overrides``) where a value
    is overridden: the YAML's own values, with the same groups chosen, give the types (Hydra
    initialised)."""
    if any(not _is_choice(o) for o in overrides):
        check_types(cfg, _reference(name, tuple(o for o in overrides if _is_choice(o))))


@functools.lru_cache(maxsize=16)
def _reference(name: str, choices: tuple[str, ...]) -> DictConfig:
    """The config with only the groups chosen: read, never changed, so it is cached."""
    return compose(name, overrides=list(choices))


def _is_choice(override: str) -> bool:
    """A group choice (``model=dense``) or a deletion (``~callbacks``): what the reference
    config that gives the values' types is composed with."""
    key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
    return override.startswith("~") or "/" in key or bool(config_options(key))


def check_types(cfg: DictConfig, reference: DictConfig | None = None) -> None:
    """Stop at the first value whose type does not fit, naming the key, the value and the type
    it needs: a value under a ``_target_`` (or a node of ``KEYWORDS_OF``) must fit the
    constructor's annotation; another must be of the kind (number, bool, list) of the same
    key's value in ``reference`` (the YAML's). ``trainer.max_steps=abc`` fails here, in one
    line, rather than deep inside Lightning."""
    for key, value, expected in _typed_values(cfg, reference, "", {}):
        if not _fits(value, expected):
            kind = type(value).__name__ if value is not None else "null"
            article = "an" if kind[0] in "aeiou" else "a"
            raise ConfigTypeError(
                f"{key}={value!r} is {article} {kind}; it needs {_describe(expected)}"
            )


def _typed_values(
    node: DictConfig, reference: object, prefix: str, hints: Mapping
) -> Iterator[tuple[str, object, object]]:
    """(key, value, expected type) of every value that has one, depth first."""
    target = node.get("_target_") if "_target_" in node else KEYWORDS_OF.get(prefix[:-1])
    targets = (target,) if isinstance(target, str) else target or ()
    hints = {name: hint for one in targets for name, hint in _hints(one).items()}
    for name in node:
        if name.startswith("_") or name == "hydra":
            continue
        try:  # reading resolves interpolations; some only resolve inside a Hydra app
            value = node[name]
            if isinstance(value, ListConfig):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException:
            continue
        ref = _get(reference, name)
        if isinstance(value, DictConfig):
            yield from _typed_values(value, ref, f"{prefix}{name}.", hints)
        elif name in hints:
            yield f"{prefix}{name}", value, hints[name]
        elif ref is not None and value is not None:
            yield f"{prefix}{name}", value, _kind(ref)


def _get(node: object, name: str) -> object:
    if not isinstance(node, DictConfig) or name not in node:
        return None
    try:
        return node[name]
    except OmegaConfBaseException:
        return None


@functools.cache
def _hints(target: str) -> dict[str, object]:
    """The annotations of the constructor (or function) at ``target``; none if unknown."""
    try:
        made = get_object(target)
        return typing.get_type_hints(made.__init__ if isinstance(made, type) else made)
    except Exception:  # an annotation that cannot be resolved leaves the node unchecked
        return {}


def _kind(reference: object) -> object:
    """What a value may be where the YAML holds ``reference``: a number for a number (ints
    and floats mix), a bool for a bool, a list for a list; any value for a string."""
    if isinstance(reference, bool):
        return bool
    if isinstance(reference, int | float):
        return float
    if isinstance(reference, ListConfig | list):
        return list
    return typing.Any


def _fits(value: object, expected: object) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if expected is type(None) or expected is None:
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected in (int, float):
        numbers = int if expected is int else int | float
        return isinstance(value, numbers) and not isinstance(value, bool)
    if expected is str or expected is os.PathLike or _is_path(expected):
        return isinstance(value, str)
    container = origin or expected
    if container in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, list) and _items_fit(value, container, args)
    if container in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict)
    return True  # a type this check cannot judge from a config value


def _items_fit(items: list, container: object, args: tuple) -> bool:
    if container is tuple and args and args[-1] is not Ellipsis:
        return len(items) == len(args) and all(map(_fits, items, args))
    return not args or all(_fits(item, args[0]) for item in items)


def _plural(described: str) -> str:
    return {"a number": "numbers", "int": "ints", "str": "strings"}.get(described, described)


def _is_path(expected: object) -> bool:
    return isinstance(expected, type) and issubclass(expected, PurePath)


def _describe(expected: object) -> str:
    """``int``, ``float or null``, ``one of 'learned', 'sincos'``, ``a list of int``."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if expected is type(None):
        return "null"
    if expected is typing.Any:
        return "any value"
    if origin in (list, tuple, Sequence) or expected in (list, tuple):
        return f"a list of {_plural(_describe(args[0]))}" if args else "a list"
    if expected is float:
        return "a number"
    return getattr(expected, "__name__", str(expected))
