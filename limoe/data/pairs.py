"""Image-caption pairs read from files: decoding to RGB, open_clip's transforms, and the
skipping of bad samples.

One map-style dataset, ``PairDataset``, serves every file format: a CSV row, a member of a
WebDataset tar shard and an ImageFolder file are all an image *source* plus a caption or a
class label. A bad sample does not stop a run: a missing file, an empty caption or a file that is not an
image is left out when the dataset is built; an image that fails to decode later is replaced
by another sample in training and marked invalid in evaluation (so metrics leave it out). Each
is logged with its path and counted (``limoe.data.skips``); a split with too few usable samples
stops the run before it trains.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.transform import image_transform
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm.auto import tqdm

from limoe.data.skips import SkipCounts, UnusableDataError

log = logging.getLogger("limoe.data")

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
WHITE = (255, 255, 255)
# Stride between the tries of a training sample whose image fails: far from the failed index,
# so the stand-in seldom lands in the same batch.
SUBSTITUTE_STRIDE = 7919
# Captions whose tokens a PairDataset keeps per process (77 int64 tokens each: 40 MB at most).
TOKEN_CACHE_SIZE = 1 << 16
# Bytes of decoded images a PairDataset keeps per process: all of a small data set (5,000
# icons at 64 px are 61 MB), so later epochs skip decoding; larger ones decode every time.
IMAGE_CACHE_BYTES = 128 << 20
MAX_TRIES = 32


@dataclass(frozen=True)
class TarMember:
    """A file inside an uncompressed tar archive, read by offset (random access); ``name``
    (the member's name) is for messages."""

    path: str
    offset: int
    size: int
    name: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.name or self.offset}"

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


ImageSource = str | TarMember


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode as RGB; transparency (RGBA, LA, palette with a transparent colour) is
    composited on ``background`` rather than dropped, which would show the hidden colours."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


def write_image(source: Path, target: Path, image_size: int) -> None:
    """The image at ``source`` composited on white, padded to a centred square (drawings are
    not all square; a square image is unchanged) and resized to ``image_size`` (0 keeps its
    size), saved at ``target``: what ``limoe-data`` writes once so loaders decode small files."""
    with Image.open(source) as image:
        image = to_rgb(image)
    side = max(image.size)
    square = Image.new("RGB", (side, side), WHITE)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if image_size:
        square = square.resize((image_size, image_size), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    square.save(target)


def open_image(source: ImageSource | bytes, background: tuple[int, int, int] = WHITE):
    """Decode an image file, tar member or bytes to an RGB PIL image (fully loaded, so a
    truncated file fails here rather than inside a transform)."""
    if isinstance(source, TarMember):
        source = source.read()
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    return to_rgb(image, background)


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


def keep_readable(
    items: Sequence[tuple[ImageSource, str | None]],
    counts: SkipCounts,
    need_caption: bool = True,
    check_images: bool = True,
) -> list[tuple[ImageSource, str | None]]:
    """The items whose file exists, whose caption is not empty and (``check_images``) whose
    header PIL can identify; each other one is counted in ``counts`` and logged with its
    path. Opening every header costs a file open per row and finds files that are not images
    before training rather than one substitution at a time."""
    kept = []
    rows = tqdm(items, desc=f"read {counts.where}", unit="row", delay=2, leave=False)
    for source, caption in rows:
        counts.rows += 1
        if isinstance(source, str) and not Path(source).is_file():
            counts.skip("missing_file", source)
        elif need_caption and not (caption or "").strip():
            counts.skip("empty_caption", source)
        elif check_images and (problem := _unidentified(source)):
            counts.skip("undecodable", source, problem)
        else:
            kept.append((source, caption))
    return kept


def _unidentified(source: ImageSource) -> str | None:
    """Why PIL cannot identify the image's format from its header; None when it can."""
    try:
        file = io.BytesIO(source.read()) if isinstance(source, TarMember) else source
        with Image.open(file):
            return None
    except Exception as error:  # PIL raises many types for files that are not images
        return f"{type(error).__name__}: {error}"


class PairDataset(Dataset):
    """``(image [3,H,W], tokens [L])`` from image sources and captions, or
    ``(image, label)`` where ``labels`` are given instead of a tokenizer (ImageFolder).

    ``sample(i)`` returns a dict with ``valid`` False where the image cannot be decoded;
    ``__getitem__`` (training) stands in the next readable sample, ``MAX_TRIES`` at most.
    """

    def __init__(
        self,
        items: Sequence[tuple[ImageSource, str | None]],
        transform: Callable,
        image_size: int,
        tokenizer: Callable | None = None,
        labels: Sequence[int] | None = None,
        background: tuple[int, int, int] = WHITE,
        counts: SkipCounts | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(items):
            raise ValueError(f"{len(labels)} labels for {len(items)} images")
        self.items = list(items)
        self.transform = transform
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.background = tuple(background)
        self.counts = counts or SkipCounts("images")
        self._tokens: dict[int, Tensor] = {}  # per process: each worker fills its own
        self._decoded: dict[int, Image.Image] = {}
        self._decoded_bytes = 0

    def _text(self, i: int) -> Tensor:
        """The tokens of caption ``i``, tokenised once per process for the first
        ``TOKEN_CACHE_SIZE`` captions met: open_clip's tokenizer (ftfy, BPE) costs about as
        much as decoding a small image, every epoch again otherwise."""
        tokens = self._tokens.get(i)
        if tokens is None:
            tokens = self.tokenizer([self.items[i][1]])[0]
            if len(self._tokens) < TOKEN_CACHE_SIZE:
                self._tokens[i] = tokens
        return tokens

    def __len__(self) -> int:
        return len(self.items)

    def with_transform(self, transform: Callable) -> PairDataset:
        """The same pairs (and skip counts) through another transform, with caches of its
        own: the training loader's uint8 view of a split (``split_normalize``)."""
        return PairDataset(
            self.items, transform, self.image_size, self.tokenizer, self.labels,
            self.background, self.counts,
        )  # fmt: skip

    def _decode(self, i: int) -> Image.Image:
        """Image ``i`` as RGB, decoded once per process while the cache has room."""
        image = self._decoded.get(i)
        if image is None:
            image = open_image(self.items[i][0], self.background)
            size = image.width * image.height * 3
            if self._decoded_bytes + size <= IMAGE_CACHE_BYTES:
                self._decoded[i] = image
                self._decoded_bytes += size
        return image

    def _image(self, i: int) -> Tensor | None:
        source = self.items[i][0]
        try:
            return self.transform(self._decode(i))
        except Exception as error:  # PIL raises many types for broken files
            self.counts.skip_loaded("undecodable")
            log.warning(
                "skipping unreadable image %s (%s): %s", source, type(error).__name__, error
            )
            return None

    def sample(self, i: int) -> dict[str, Tensor]:
        """One sample as a dict (``image``, ``text`` or ``labels`` [1], ``valid``): what the
        evaluation loaders yield, so that no sample is replaced there."""
        image = self._image(i)
        out = {"valid": torch.tensor(image is not None)}
        out["image"] = image if image is not None else torch.zeros(3, *_size2(self.image_size))
        if self.tokenizer is not None:
            out["text"] = self._text(i)
        if self.labels is not None:
            out["labels"] = self.labels[i : i + 1]  # one task; shapes carries one per attribute
        return out

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        for attempt in range(MAX_TRIES):
            j = (i + attempt * SUBSTITUTE_STRIDE) % len(self)
            image = self._image(j)
            if image is not None:
                return image, self._text(j) if self.tokenizer is not None else self.labels[j]
        raise UnusableDataError(
            f"{self.counts.where}: no readable image among {MAX_TRIES} samples tried from "
            f"index {i} (each skip is logged with its path)"
        )


def _size2(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    return tuple(image_size[-2:])


class IndexedSamples(Dataset):
    """Evaluation view of a dataset with a ``sample(i)`` dict (``PairDataset``,
    ``ProceduralPairs``): each item that dict with its ``index`` (ranks gather and de-duplicate
    by it under DDP, whose sampler pads the last shard with repeats)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"index": torch.tensor(i), **self.dataset.sample(i)}
