"""What the embedded procedural datasets (``shapes``, ``scenes``) share: a table of hashed
draws per split, images rendered on access, captions tokenised once per distinct string, and
per-sample labels for the zero-shot tasks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch.utils.data import Dataset

# Images are scaled to [-1, 1]: mean .5 and std .5 in [0, 1] units.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class ProceduralPairs(Dataset):
    """``size`` samples of one split: ``(image [3,H,W] in [-1,1], tokens [L])`` (+ labels).

    A subclass says how to draw the split's table (``sample_table``: every field an array over
    samples, the label fields named by ``task_names``), what one row is (``row``: an object
    with a ``caption()``) and how it looks (``draw``). Tokenised captions are cached per distinct
    caption string: there are far fewer of them than samples, and BPE is the slow part.
    """

    task_names: tuple[str, ...] = ()

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
        """The defaults are the ``shapes`` data set's (``ShapesDataset``); ``ScenesDataset``
        changes three of them."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        table = self.sample_table(
            seed, split, np.arange(size), partial_captions, partial_from,
            hard_negatives, hard_negative_attributes,
        )  # fmt: skip
        self.split = split
        self.seed = seed
        self.size = size
        self.image_size = image_size
        self.return_labels = return_labels
        if tokenizer is None:  # a given tokenizer (shared by a datamodule) sets its own length
            tokenizer = SimpleTokenizer(context_length=context_length)
        self.tokenizer = tokenizer
        self._table = table
        self._labels = torch.from_numpy(np.stack([table[t] for t in self.task_names], axis=1))
        self._token_cache: dict[str, torch.Tensor] = {}

    # --- given by each dataset ----------------------------------------------------------------

    @staticmethod
    def sample_table(
        seed: int,
        split: str,
        indices: np.ndarray,
        partial_captions: float,
        partial_from: int,
        hard_negatives: float,
        hard_negative_attributes: Sequence[str],
    ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def row(self, i: int):
        raise NotImplementedError

    def draw(self, row) -> np.ndarray:
        """uint8 [H, W, 3]: the image of one row."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.size

    def _check_index(self, i: int) -> int:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.split} split of size {self.size}")
        return int(i)

    def caption(self, i: int) -> str:
        return self.row(self._check_index(i)).caption()

    def image_uint8(self, i: int) -> np.ndarray:
        return self.draw(self.row(self._check_index(i)))

    def labels(self, i: int) -> torch.Tensor:
        """long [num_tasks]: class indices in ``task_names`` order."""
        return self._labels[self._check_index(i)].clone()

    def tokens(self, caption: str) -> torch.Tensor:
        cached = self._token_cache.get(caption)
        if cached is None:
            cached = self.tokenizer([caption])[0]
            self._token_cache[caption] = cached
        return cached.clone()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        row = self.row(self._check_index(i))
        image = torch.from_numpy(self.draw(row)).permute(2, 0, 1)
        image = image.float().div_(127.5).sub_(1.0)
        tokens = self.tokens(row.caption())
        if self.return_labels:
            return image, tokens, self._labels[i].clone()
        return image, tokens

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """One sample as the evaluation loaders' dict (``image``, ``text``, ``labels`` with one
        column per zero-shot task, ``valid``: always, nothing is read from disk)."""
        image, tokens, labels = self[i]
        return {"image": image, "text": tokens, "labels": labels, "valid": torch.tensor(True)}
