"""The one factory: a model from its config (``build_model``, whoever asks: the
LightningModule, ``create_model``, ``create_model_and_transforms``, ``limoe-export``), by config
name (``create_model``), or with its preprocessing and tokenizer, as open_clip's
``create_model_and_transforms`` and ``get_tokenizer``, from a config name (random weights), a
``limoe-train`` checkpoint or a ``limoe-export`` folder (trained weights); and
``export_model``, which writes that folder.

``build_model`` checks that the tower's shape can exist, instantiates the ``_target_``, starts
a LIMoE from a dense checkpoint where the config names one (``upcycle_from``) and loads
trained weights where given. An export is ``model.safetensors`` (the model's weights alone:
no optimiser state, no Lightning) and ``config.json``: the model's config (a ``_target_`` and
its arguments, as Hydra instantiates it) and its preprocessing (image size, normalisation,
augmentation, the background transparent pixels are composited on, the tokenizer's context
length), so the transforms and tokenizer rebuilt from it are those the model was trained with.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from limoe.checkpoint import model_weights, read_checkpoint
from limoe.config import MOVED_MOE_KEYS, compose_config, config_options
from limoe.data.preprocess import Preprocess
from limoe.models.upcycle import pop_upcycle, upcycle
from limoe.moe import ROUTERS

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "limoe-export/1"
RUN_CHECKPOINT = Path("checkpoints") / "last.ckpt"  # a limoe-train run folder's weights


# Where each shape argument of the model config comes from in conf/: size/ (every arm
# reads the same tower size) or data/ (what the images and captions are).
SOURCE_KEY = {
    "width": "size.width",
    "num_heads": "size.num_heads",
    "depth": "size.depth",
    "embed_dim": "size.embed_dim",
    "patch_size": "size.patch_size",
    "image_size": "data.image_size",
    "context_length": "data.context_length",
}


def _key(name: str, value: object) -> str:
    """``model.width=30 (size.width)``: the model's key and the one the configs set it from."""
    source = SOURCE_KEY.get(name)
    return f"model.{name}={value}" + (f" ({source})" if source else "")


def check_tower(cfg: Mapping) -> None:
    """One line naming the key, for a tower shape no model can take (timm and open_clip stop
    with an assertion deep inside instead): sizes below 1, a width that the heads do not
    divide, an image the patches do not tile, a width the 2-D sin-cos position embedding cannot split into four parts."""
    for name in SOURCE_KEY:
        value = cfg.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"{_key(name, value)} must be at least 1")
    width, heads = cfg.get("width"), cfg.get("num_heads")
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise ValueError(
            f"{_key('width', width)} must be a multiple of {_key('num_heads', heads)}: "
            "each attention head takes an equal part of the width"
        )
    size, patch = cfg.get("image_size"), cfg.get("patch_size")
    if isinstance(size, int) and isinstance(patch, int) and size % patch:
        raise ValueError(
            f"{_key('image_size', size)} must be a multiple of {_key('patch_size', patch)}: "
            "the image is cut into whole patches"
        )
    if cfg.get("image_pos_embed") == "sincos" and isinstance(width, int) and width % 4:
        raise ValueError(
            f"{_key('width', width)} must be a multiple of 4 for the 2-D sin-cos position "
            "embedding (model.image_pos_embed=sincos; or set it to learned)"
        )


def upgrade_moe(moe: Mapping) -> dict:
    """A ``model.moe`` node stored before the router, experts and losses had nodes of their
    own (flat keys, ``router`` a name: checkpoints and exports of earlier versions), in
    today's form; a node in today's form comes back as it is."""
    moe = dict(moe)
    if not isinstance(moe.get("router"), str) and not set(moe) & set(MOVED_MOE_KEYS):
        return moe
    router = ROUTERS[moe.pop("router", "topk")]
    options = set(inspect.signature(router.__init__).parameters) - {"self", "dim", "num_experts"}
    parts = {
        "router": {"_target_": f"limoe.moe.{router.__name__}", "_partial_": True},
        "experts": {"_target_": "limoe.moe.Experts", "_partial_": True},
        "losses": {"_target_": "limoe.moe.RouterLosses"},
    }
    for old, new in MOVED_MOE_KEYS.items():
        part, key = new.split(".")
        if old in moe and (part != "router" or key in options):
            parts[part][key] = moe.pop(old)
        moe.pop(old, None)
    return {**moe, **parts}


# ``model.compile``: read here, never passed to the model. True compiles the model's forward
# with ``torch.compile`` (``nn.Module.compile``, in place) once the weights are in.
COMPILE_KEY = "compile"


def build_model(
    cfg: Mapping, weights: Mapping[str, Tensor] | str | Path | None = None, **kwargs
) -> nn.Module:
    """The model of ``cfg`` (a ``_target_`` and its arguments; ``kwargs`` override them).

    ``weights``: a state dict, or the path of a ``model.safetensors``; loaded strictly. Without
    them, a config with ``upcycle_from`` starts from that dense checkpoint (``upcycle``). With
    ``compile`` true the forward is compiled (``torch.compile``).
    """
    if "_target_" not in cfg:
        raise ValueError(f"a model config needs a _target_, got keys {sorted(cfg)}")
    cfg, upcycle_from = pop_upcycle({**cfg, **kwargs})
    compiled = cfg.pop(COMPILE_KEY, False)
    if isinstance(cfg.get("moe"), Mapping):
        cfg["moe"] = upgrade_moe(cfg["moe"])
    check_tower(cfg)
    model = instantiate(cfg, _convert_="all")
    if isinstance(weights, str | Path):
        load_model(model, str(weights), strict=True)
    elif weights is not None:
        model.load_state_dict(weights, strict=True)
    elif upcycle_from:
        upcycle(model, model_weights(read_checkpoint(upcycle_from, "model.upcycle_from")))
    if compiled:
        model.compile()  # in place: the state dict keeps its keys
    return model


def _from_name(name: str, overrides: list[str]) -> tuple[dict, Preprocess, None]:
    """``limoe-train``'s config with ``model=name``: its model node and its data's
    preprocessing."""
    known = config_options("model")
    if name not in known:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(known)}")
    cfg = compose_config("train", [f"model={name}", *overrides])
    model, data = (OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "data"))
    return model, Preprocess.of_data(data), None


def _from_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    ckpt = read_checkpoint(path)
    hparams = ckpt["hyper_parameters"]
    if not hparams.get("data"):
        raise ValueError(f"{path}: the checkpoint holds no data config to take preprocessing from")
    return dict(hparams["model"]), Preprocess.of_data(hparams["data"]), model_weights(ckpt)


def _read_export(folder: Path) -> dict:
    config_path = folder / CONFIG
    if not (folder / WEIGHTS).is_file() or not config_path.is_file():
        raise ValueError(
            f"{folder} is not a limoe export: it needs {WEIGHTS} and {CONFIG} "
            f"(write one with limoe-export ckpt=... out=DIR), or a run folder's {RUN_CHECKPOINT}"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a limoe export config (no format {FORMAT!r})")
    return config


def resolve(name_or_path: str | Path, overrides: list[str] | None = None):
    """``(model config, preprocessing, weights)`` of a config name (weights ``None``), a
    checkpoint file or a ``limoe-train`` run folder (a state dict) or an export folder (the
    path of its safetensors)."""
    path = Path(name_or_path)
    # A config name wins over a folder of that name (the package's own folder, in a checkout)
    # unless the folder is an export.
    if str(name_or_path) in config_options("model") and not (path / CONFIG).is_file():
        return _from_name(str(name_or_path), list(overrides or []))
    if path.is_dir() and not (path / CONFIG).is_file() and (path / RUN_CHECKPOINT).is_file():
        return _from_checkpoint(path / RUN_CHECKPOINT)  # a run folder: its last checkpoint
    if path.is_dir():
        config = _read_export(path)
        return config["model"], Preprocess.from_dict(config["preprocess"]), path / WEIGHTS
    if path.is_file():
        return _from_checkpoint(path)
    raise ValueError(
        f"{name_or_path} is neither a model config ({', '.join(config_options('model'))}) nor "
        "an existing checkpoint file, run folder or export folder"
    )


def create_model(
    name_or_cfg: str | Mapping, overrides: list[str] | None = None, **kwargs
) -> nn.Module:
    """Build a model from a config name, with Hydra-style ``overrides`` (``["model.depth=2"]``),
    or from a mapping that has a ``_target_``; ``kwargs`` override the config's arguments.
    Random weights, or a dense checkpoint's upcycled where the config has ``upcycle_from``."""
    if isinstance(name_or_cfg, str):
        name_or_cfg = _from_name(name_or_cfg, list(overrides or []))[0]
    return build_model(name_or_cfg, **kwargs)


def _build(model_cfg: Mapping, weights, device: str | torch.device | None) -> nn.Module:
    return build_model(model_cfg, weights).to(device or "cpu").eval()


def create_model_and_transforms(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    overrides: list[str] | None = None,
) -> tuple[nn.Module, Callable, Callable]:
    """``(model in eval mode, preprocess_train, preprocess_val)``, as open_clip's function:
    ``name_or_path`` is a model config (``limoe``, ``dense``, ``clip``; Hydra ``overrides``
    such as ``["data=tabler"]`` apply), a ``.ckpt`` from ``limoe-train`` (or its run folder,
    which holds ``checkpoints/last.ckpt``) or a ``limoe-export`` folder."""
    model_cfg, preprocess, weights = resolve(name_or_path, overrides)
    return _build(model_cfg, weights, device), *preprocess.transforms()


def get_tokenizer(name_or_path: str | Path, overrides: list[str] | None = None) -> SimpleTokenizer:
    """open_clip's tokenizer with the context length the model reads."""
    _, preprocess, _ = resolve(name_or_path, overrides)
    return preprocess.tokenizer()


def export_model(ckpt: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's model as ``out/model.safetensors`` + ``out/config.json``.
    Checkpoints of expert-parallel runs hold every expert already, so they export whole."""
    model_cfg, preprocess, state = _from_checkpoint(Path(ckpt))
    model = _build(model_cfg, state, "cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS))
    config = {"format": FORMAT, "model": model_cfg, "preprocess": preprocess.as_dict()}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
