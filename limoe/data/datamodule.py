"""LightningDataModule for the embedded shapes dataset.

Plain keyword arguments only, so Hydra can build it straight from ``conf/data/shapes.yaml``.
The evaluation loaders carry attribute labels for zero-shot classification; ``eval_names``
tells the LightningModule which metric prefix each evaluation loader gets.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from open_clip.tokenizer import SimpleTokenizer
from torch.utils.data import DataLoader

from limoe.data.shapes import SPLITS, ShapesDataset, ZeroShotTask, zeroshot_tasks

# Evaluation loaders per stage, as (split, metric prefix); the order is the dataloader_idx.
_EVAL_SPLITS: dict[str, tuple[tuple[str, str], ...]] = {
    "fit": (("val", "val"),),
    "validate": (("val", "val"),),
    "test": (("test", "test"), ("novel", "test_novel")),
}


class ShapesDataModule(L.LightningDataModule):
    """Train/val/test/novel loaders over ShapesDataset, sharing one tokenizer."""

    def __init__(
        self,
        image_size: int = 32,
        context_length: int = 32,
        seed: int = 0,
        train_size: int = 200_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        novel_size: int = 1_000,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        partial_captions: float = 0.2,
        partial_captions_from_step: int = 0,
        hard_negatives: float = 0.0,
        hard_negative_attributes: Sequence[str] = ("shape", "position"),
    ) -> None:
        super().__init__()
        _check_positive(
            image_size=image_size,
            context_length=context_length,
            val_size=val_size,
            test_size=test_size,
            novel_size=novel_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
        )
        if train_size < batch_size:
            raise ValueError(f"train_size ({train_size}) must be >= batch_size ({batch_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if partial_captions_from_step < 0:
            raise ValueError(
                f"partial_captions_from_step must be >= 0, got {partial_captions_from_step}"
            )
        group = 1 << len(hard_negative_attributes)
        if hard_negatives > 0 and batch_size % group:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of the hard-negative group size "
                f"({group} = 2 ** len(hard_negative_attributes)), so groups never span batches"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters(logger=False)
        self.image_size = image_size
        self.context_length = context_length
        self.seed = seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size, "novel": novel_size}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.partial_captions = partial_captions  # train split only: eval captions are full
        self.partial_captions_from_step = partial_captions_from_step
        self.hard_negatives = hard_negatives  # train split only: evaluation pairs are i.i.d.
        self.hard_negative_attributes = hard_negative_attributes
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self._datasets: dict[str, ShapesDataset] = {}

    @property
    def zeroshot_tasks(self) -> dict[str, ZeroShotTask]:
        return zeroshot_tasks()

    def dataset(self, split: str) -> ShapesDataset:
        """The dataset of one split, built on first use (cheap: attributes are hashed)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._datasets:
            self._datasets[split] = ShapesDataset(
                split,
                self.sizes[split],
                image_size=self.image_size,
                seed=self.seed,
                tokenizer=self.tokenizer,
                context_length=self.context_length,
                return_labels=split != "train",
                partial_captions=self.partial_captions if split == "train" else 0.0,
                partial_from=self._partial_from() if split == "train" else 0,
                hard_negatives=self.hard_negatives if split == "train" else 0.0,
                hard_negative_attributes=self.hard_negative_attributes,
            )
        return self._datasets[split]

    def _partial_from(self) -> int:
        """First train index with partial captions: the train loader reads samples in order
        (each is an independent hash draw, so order adds no bias), one ``batch_size`` per step on
        each of ``world_size`` processes."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        first = self.partial_captions_from_step * self.batch_size * world_size
        if self.partial_captions > 0 and first >= self.sizes["train"]:
            raise ValueError(
                f"partial_captions_from_step={self.partial_captions_from_step} starts past the "
                f"end of the train split (train_size={self.sizes['train']})"
            )
        return first

    def setup(self, stage: str | None = None) -> None:
        for stage_key in ("fit", "test") if stage is None else (stage,):
            if stage_key == "fit":
                self.dataset("train")
            for split, _ in _EVAL_SPLITS.get(stage_key, ()):
                self.dataset(split)

    def eval_names(self, stage: str) -> list[str]:
        """Metric prefix of each evaluation loader of ``stage``, in dataloader_idx order."""
        if stage not in _EVAL_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {tuple(_EVAL_SPLITS)}")
        return [prefix for _, prefix in _EVAL_SPLITS[stage]]

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=False,  # samples are i.i.d. draws already; order keeps the curriculum
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        self._warn_if_split_wraps()
        return self._loader("train", self.batch_size, train=True)

    def _warn_if_split_wraps(self) -> None:
        """The curriculum lives in the sample order, so a run longer than one pass over the
        train split starts it again (full captions only) when the split runs out."""
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        world_size = self.trainer.world_size if self.trainer is not None else 1
        steps_per_pass = self.sizes["train"] // (self.batch_size * world_size)
        if max_steps > steps_per_pass:
            rank_zero_warn(
                f"data.train_size={self.sizes['train']} lasts {steps_per_pass} steps but "
                f"max_steps={max_steps}: later steps re-read the split from the start "
                "(captions full again); raise data.train_size to keep the curriculum"
            )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, train=False)

    def test_dataloader(self) -> list[DataLoader]:
        return [
            self._loader(split, self.eval_batch_size, train=False) for split in ("test", "novel")
        ]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
