"""``limoe-eval probe.task=NAME`` (or ``probe.train=DIR probe.test=DIR``): a linear probe on a
trained model's frozen image features (``limoe.eval.probe``, CLIP_benchmark's recipe).

The features of the probe's train and test images are computed once per checkpoint and
cached (``OUT/probe/NAME_{train,test}.pt``, with what they were computed from), so probes
with other options (learning rate, epochs, a validation share) cost seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from limoe.eval.probe import ProbeOptions, linear_probe

log = logging.getLogger("limoe")
# What decides the features: the rest of the probe node only changes the probe.
FEATURE_KEYS = ("task", "train", "test", "train_size")


def wanted(probe: Mapping | None) -> bool:
    return bool(probe) and bool(probe.get("task") or probe.get("train") or probe.get("test"))


def probe_name(probe: Mapping) -> str:
    """``probe.name``, or the task, or the folder that holds the train tree."""
    return probe.get("name") or probe.get("task") or Path(probe["train"]).resolve().parent.name


@torch.no_grad()
def image_features(
    model: nn.Module, samples: Dataset, column: int, batch_size: int, desc: str
) -> tuple[Tensor, Tensor]:
    """Normalised image features and the labels of ``column``, of the readable samples."""
    device = next(model.parameters()).device
    features, labels = [], []
    for batch in tqdm(DataLoader(samples, batch_size=batch_size), desc=desc, unit="batch"):
        keep = batch["valid"].bool()
        encoded = model.encode_image(batch["image"][keep].to(device), normalize=True)
        features.append(encoded.float().cpu())
        labels.append(batch["labels"][keep][:, column])
    return torch.cat(features), torch.cat(labels).long()


def cached(path: Path, key: dict, compute) -> tuple[Tensor, Tensor]:
    """``compute()``'s features, read from ``path`` when it holds those of ``key``."""
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored.get("key") == key:
            log.info(f"limoe: probe features from {path}")
            return stored["features"], stored["labels"]
    features, labels = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "features": features, "labels": labels}, path)
    return features, labels


def options(probe: Mapping) -> ProbeOptions:
    return ProbeOptions(**{k: probe[k] for k in ProbeOptions.__dataclass_fields__})


def probe_images(probe: Mapping, datamodule) -> tuple[Dataset, Dataset, int]:
    """The probe's train and test samples and label column (``datamodule.probe_sets``), its
    options checked: a bad probe stops ``limoe-eval`` before the test runs, not after."""
    options(probe)
    return datamodule.probe_sets(probe)


def probe_metrics(
    model: nn.Module,
    images: tuple[Dataset, Dataset, int],
    probe: Mapping,
    ckpt: str | Path,
    out: Path,
    batch_size: int,
) -> dict[str, float]:
    """``probe/NAME_acc1``, ``_acc5``, ``_mean_per_class_recall``, ``_weight_decay`` of a
    probe trained on the train images' features and tested on the test images'."""
    name = probe_name(probe)
    train, test, column = images
    stat = Path(ckpt).stat()
    key = {"ckpt": str(Path(ckpt).resolve()), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size,
           **{k: probe.get(k) for k in FEATURE_KEYS}}  # fmt: skip
    found = {}
    for split, samples in (("train", train), ("test", test)):
        path = out / "probe" / f"{name}_{split}.pt"
        compute = partial(
            image_features, model, samples, column, batch_size, f"probe {name} {split}"
        )
        found[split] = cached(path, key, compute) if probe.get("cache", True) else compute()
    metrics = linear_probe(found["train"], found["test"], options(probe))
    return {f"probe/{name}_{k}": float(v) for k, v in metrics.items()}
