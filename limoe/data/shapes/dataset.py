"""``ShapesDataset``, and the shapes samples as files (PNGs plus an open_clip CSV)."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch.utils.data import Dataset

from limoe.data.shapes.attributes import Attributes
from limoe.data.shapes.render import render
from limoe.data.shapes.sampling import row_attributes, sample_table
from limoe.data.shapes.tasks import TASK_NAMES

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class ShapesDataset(Dataset):
    """``size`` samples of one split: ``(image [3,H,W] in [-1,1], tokens [L])`` (+ labels).

    All attributes are drawn up front (vectorised, a few ms for 200k samples); images are
    rendered on access and tokenised captions are cached per distinct caption string, since
    there are far fewer distinct captions than samples and the BPE tokenizer is the slow part.
    """

    def __init__(
        self,
        split: str,
        size: int,
        image_size: int = 32,
        seed: int = 0,
        tokenizer: SimpleTokenizer | None = None,
        context_length: int = 32,
        return_labels: bool = False,
        partial_captions: float = 0.0,
        partial_from: int = 0,
        hard_negatives: float = 0.0,
        hard_negative_attributes: Sequence[str] = ("shape", "position"),
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.split = split
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.return_labels = return_labels
        if tokenizer is None:  # a given tokenizer (shared by a datamodule) sets its own length
            tokenizer = SimpleTokenizer(context_length=context_length)
        self.tokenizer = tokenizer
        self._table = sample_table(
            seed, split, np.arange(size), partial_captions, partial_from,
            hard_negatives, hard_negative_attributes,
        )  # fmt: skip
        self._labels = torch.from_numpy(np.stack([self._table[t] for t in TASK_NAMES], axis=1))
        self._token_cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.size

    def _check_index(self, i: int) -> int:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.split} split of size {self.size}")
        return int(i)

    def attributes(self, i: int) -> Attributes:
        return row_attributes(self._table, self._check_index(i))

    def caption(self, i: int) -> str:
        return self.attributes(i).caption()

    def image_uint8(self, i: int) -> np.ndarray:
        return render(self.attributes(i), self.image_size)

    def labels(self, i: int) -> torch.Tensor:
        """long [num_tasks]: attribute indices in TASK_NAMES order."""
        return self._labels[self._check_index(i)].clone()

    def tokens(self, caption: str) -> torch.Tensor:
        cached = self._token_cache.get(caption)
        if cached is None:
            cached = self.tokenizer([caption])[0]
            self._token_cache[caption] = cached
        return cached.clone()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        attrs = self.attributes(i)
        image = torch.from_numpy(render(attrs, self.image_size)).permute(2, 0, 1)
        image = image.float().div_(127.5).sub_(1.0)  # mean .5, std .5 in [0, 1] units
        tokens = self.tokens(attrs.caption())
        if self.return_labels:
            return image, tokens, self._labels[i].clone()
        return image, tokens


# --------------------------------------------------------------------------- export


def rendered_samples(
    split: str, size: int, image_size: int = 32, seed: int = 0
) -> Iterator[tuple[int, Attributes, np.ndarray]]:
    """``(index, attributes, image [H, W, 3] uint8)`` of the first ``size`` samples of a
    split, as the exporters write them (full captions, no curriculum)."""
    table = sample_table(seed, split, np.arange(size))
    for i in range(size):
        attrs = row_attributes(table, i)
        yield i, attrs, render(attrs, image_size)


def export_csv(
    split: str, size: int, out_dir: str | Path, image_size: int = 32, seed: int = 0
) -> Path:
    """Write ``size`` samples as PNGs plus an open_clip CSV (tab separated: filepath, title).

    Image paths are relative to the CSV's folder, so the folder can be moved as a whole and
    read by open_clip's CsvDataset or limoe's csv datamodule.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{split}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for i, attrs, image in rendered_samples(split, size, image_size, seed):
            rel = f"{split}/{i:06d}.png"
            Image.fromarray(image).save(out_dir / rel)
            writer.writerow([rel, attrs.caption()])
    return csv_path
