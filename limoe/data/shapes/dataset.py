"""``ShapesDataset``, and the shapes samples as files (PNGs plus an open_clip CSV)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from limoe.data.procedural import ProceduralPairs
from limoe.data.shapes.attributes import Attributes
from limoe.data.shapes.captions import caption_roles
from limoe.data.shapes.render import render, shape_mask
from limoe.data.shapes.sampling import row_attributes, sample_table
from limoe.data.shapes.tasks import TASK_NAMES


class ShapesDataset(ProceduralPairs):
    """``size`` samples of one split: ``(image [3,H,W] in [-1,1], tokens [L])`` (+ labels).

    All attributes are drawn up front (vectorised, a few ms for 200k samples); images are
    rendered on access (``ProceduralPairs``).
    """

    task_names = TASK_NAMES
    sample_table = staticmethod(sample_table)

    def row(self, i: int) -> Attributes:
        return row_attributes(self._table, i)

    def draw(self, row: Attributes) -> np.ndarray:
        return render(row, self.image_size)

    def attributes(self, i: int) -> Attributes:
        return self.row(self._check_index(i))

    def object_mask(self, i: int) -> np.ndarray:
        """bool [H, W]: the pixels the shape covers (for the routing analysis)."""
        return shape_mask(self.attributes(i), self.image_size)

    def caption_roles(self, i: int) -> list[str]:
        """The role of each token of sample ``i``'s tokenised caption (``caption_roles``)."""
        attrs = self.attributes(i)
        tokens = self.tokens(attrs.caption())
        return caption_roles(attrs.names, attrs.mention, tokens, self.tokenizer)


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
