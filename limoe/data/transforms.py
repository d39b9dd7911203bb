"""open_clip's image transforms as the loaders run them: its pipeline with a faster crop of the
same distribution, and cut before Normalize so workers send uint8 images and the batch is
normalised on its device."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from open_clip.transform import image_transform
from PIL import Image
from torch import Tensor
from torchvision import transforms


class RandomResizedCrop(transforms.RandomResizedCrop):
    """torchvision's crop, its box drawn with Python's ``random`` by the same rule (up to ten
    tries of an area share in ``scale`` and a log-uniform aspect in ``ratio``, else the
    largest centred crop within ``ratio``) and cut and resized by one PIL call. torchvision
    draws through one-element torch tensors and crops before it resizes: 284 µs for a 64 px
    icon against 94 µs here. PIL's resize of a box reads the pixels just outside it for the
    filter, where a crop first would repeat its edge. DataLoader workers seed ``random`` per
    worker as they seed torch."""

    @staticmethod
    def get_params(
        img: Image.Image | Tensor, scale: Sequence[float], ratio: Sequence[float]
    ) -> tuple[int, int, int, int]:
        width, height = transforms.functional.get_image_size(img)
        area = width * height
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target_area = area * random.uniform(scale[0], scale[1])
            aspect = math.exp(random.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        aspect = width / height
        if aspect < min(ratio):
            w, h = width, round(width / min(ratio))
        elif aspect > max(ratio):
            w, h = round(height * max(ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def forward(self, img: Image.Image | Tensor) -> Image.Image | Tensor:
        if not isinstance(img, Image.Image):
            return super().forward(img)
        top, left, h, w = self.get_params(img, self.scale, self.ratio)
        resample = transforms.functional.pil_modes_mapping[self.interpolation]
        return img.resize(self.size[::-1], resample, box=(left, top, left + w, top + h))


def build_transform(
    image_size: int,
    train: bool,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augment: dict | None = None,
) -> Callable:
    """open_clip's transform: RandomResizedCrop (+ ``augment``, open_clip's AugmentationCfg
    keys) in training; resize of the shortest side and centre crop in evaluation. Its
    torchvision crop is swapped for ``RandomResizedCrop`` above (same distribution)."""
    transform = image_transform(
        image_size,
        is_train=train,
        mean=tuple(mean) if mean else None,
        std=tuple(std) if std else None,
        aug_cfg=dict(augment or {}),
    )
    if isinstance(transform, transforms.Compose):
        transform.transforms = [_fast_crop(t) for t in transform.transforms]
    return transform


def _fast_crop(step: Callable) -> Callable:
    if type(step) is not transforms.RandomResizedCrop:
        return step
    return RandomResizedCrop(step.size, step.scale, step.ratio, step.interpolation, step.antialias)


def split_normalize(transform: Callable) -> tuple[Callable, transforms.Normalize | None]:
    """``transform`` cut before its float conversion and Normalize, so that it returns uint8
    ``[3,H,W]``, and that Normalize, for the batch on its device: a loader worker then skips
    two of its costliest steps and sends a quarter of the bytes. ``(transform, None)`` when
    the transform does not end so (timm's pipelines, random erasing after Normalize)."""
    steps = getattr(transform, "transforms", [])
    if len(steps) < 2 or not isinstance(steps[-1], transforms.Normalize):
        return transform, None
    if not isinstance(steps[-2], transforms.ToTensor):  # open_clip's MaybeToTensor too
        return transform, None
    return transforms.Compose([*steps[:-2], transforms.PILToTensor()]), steps[-1]


def normalize_images(images: Tensor, normalize: transforms.Normalize) -> Tensor:
    """uint8 images ``[..., 3, H, W]`` (``split_normalize``'s) as the whole transform gives
    them: scaled to [0, 1] as ToTensor does, then normalised."""
    return normalize(images.to(torch.float32).div_(255))


def size2(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    return tuple(image_size[-2:])
