"""Models that load like open_clip's: ``create_model_and_transforms`` and ``get_tokenizer`` from
a config name (random weights), a ``limoe-train`` checkpoint or a ``limoe-export`` folder
(trained weights), and ``export_model``, which writes that folder.

An export is ``model.safetensors`` (the model's weights alone: no optimiser state, no
Lightning) and ``config.json``: the model's config (a ``_target_`` and its arguments, as Hydra
instantiates it) and its preprocessing (image size, normalisation, augmentation, the
background transparent pixels are composited on, the tokenizer's context length), so the
transforms and tokenizer rebuilt from it are those the model was trained with.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_model
from torch import nn

from limoe.checkpoint import model_weights, read_checkpoint
from limoe.config import compose_config, config_options
from limoe.data.preprocess import Preprocess
from limoe.models.build import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "limoe-export/1"


def _from_name(name: str, overrides: list[str]) -> tuple[dict, dict, None]:
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
            "(write one with limoe-export ckpt=... out=DIR)"
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
    checkpoint file (a state dict) or an export folder (the path of its safetensors)."""
    path = Path(name_or_path)
    # A config name wins over a folder of that name (the package's own folder, in a checkout)
    # unless the folder is an export.
    if str(name_or_path) in config_options("model") and not (path / CONFIG).is_file():
        return _from_name(str(name_or_path), list(overrides or []))
    if path.is_dir():
        config = _read_export(path)
        return config["model"], Preprocess.from_dict(config["preprocess"]), path / WEIGHTS
    if path.is_file():
        return _from_checkpoint(path)
    raise ValueError(
        f"{name_or_path} is neither a model config ({', '.join(config_options('model'))}) nor "
        "an existing checkpoint file or export folder"
    )


def _build(model_cfg: Mapping, weights, device: str | torch.device | None) -> nn.Module:
    return build_model(model_cfg, weights).to(device or "cpu").eval()


def create_model_and_transforms(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    overrides: list[str] | None = None,
) -> tuple[nn.Module, Callable, Callable]:
    """``(model in eval mode, preprocess_train, preprocess_val)``, as open_clip's function:
    ``name_or_path`` is a model config (``limoe``, ``dense``, ``clip``; Hydra ``overrides``
    such as ``["data=tabler"]`` apply), a ``.ckpt`` from ``limoe-train`` or a ``limoe-export``
    folder."""
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
