"""Image-caption pairs read from files as a dataset, and the skipping of bad samples.

One map-style dataset, ``PairDataset``, serves every file format: a CSV row, a member of a
WebDataset tar shard and an ImageFolder file are all an image *source* plus a caption or a
class label. A bad sample does not stop a run: a missing file, an empty caption or a file that is not an
image is left out when the dataset is built; an image that fails to decode later is replaced
by another sample in training and marked invalid in evaluation (so metrics leave it out). Each
is logged with its path and counted (``limoe.data.skips``); a split with too few usable samples
stops the run before it trains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from limoe.data.images import WHITE, ImageSource, open_image
from limoe.data.skips import SkipCounts, UnusableDataError
from limoe.data.transforms import size2

log = logging.getLogger("limoe.data")

# Stride between the tries of a training sample whose image fails: far from the failed index,
# so the stand-in seldom lands in the same batch.
SUBSTITUTE_STRIDE = 7919
# Captions whose tokens a PairDataset keeps per process (77 int64 tokens each: 40 MB at most).
TOKEN_CACHE_SIZE = 1 << 16
# Bytes of decoded images a PairDataset keeps per process: all of a small data set (5,000
# icons at 64 px are 61 MB), so later epochs skip decoding; larger ones decode every time.
IMAGE_CACHE_BYTES = 128 << 20
MAX_TRIES = 32


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
        out["image"] = image if image is not None else torch.zeros(3, *size2(self.image_size))
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
