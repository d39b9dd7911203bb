"""Image-caption pairs from files in open_clip's formats as a datamodule: CSV files and
WebDataset tar shards, each split's format told by its extension."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import DataLoader

from limoe.data.csv import CsvSource
from limoe.data.datamodule import PairDataModule, _check_positive
from limoe.data.images import WHITE
from limoe.data.loading import ResumableLoader
from limoe.data.pairs import IndexedSamples, PairDataset
from limoe.data.preprocess import Preprocess
from limoe.data.transforms import build_transform, normalize_images, split_normalize
from limoe.data.webdataset import ShardSource, ShardStream
from limoe.eval.plan import EvalSet


class ImageTextDataModule(PairDataModule):
    """Image-caption pairs from open_clip's formats: CSV files (``filepath``/``title`` columns,
    tab separated, image paths relative to the CSV) and WebDataset tar shards
    (``shards/{000000..000099}.tar`` of ``jpg``/``png``/``webp`` + ``txt`` members).

    ``dataset_type`` ``auto`` reads ``*.csv``/``*.tsv`` as CSV and ``*.tar`` as shards, per
    split. CSV training is map-style and shuffled per epoch; shard training streams
    ``train_num_samples`` pairs per epoch. ``val_data`` and ``test_data`` report retrieval
    metrics (``val/``, ``test/``), each ``extra_test`` split under ``test_<name>/`` (e.g.
    held-out concepts as ``test_novel/``); zero-shot tasks come from ``zeroshot`` folders.
    """

    def __init__(
        self,
        train_data: str | None = None,
        val_data: str | None = None,
        test_data: str | None = None,
        extra_test: Mapping[str, str] | None = None,
        dataset_type: str = "auto",
        csv_img_key: str = "filepath",
        csv_caption_key: str = "title",
        csv_separator: str = "\t",
        train_num_samples: int | None = None,
        shuffle_buffer: int = 1000,
        image_size: int = 32,
        context_length: int = 24,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Mapping | None = None,
        background: Sequence[int] = WHITE,
        zeroshot: Mapping | None = None,
        max_skipped_fraction: float = 0.5,
        check_images: bool = True,
    ) -> None:
        pre = self._preprocess({"image_size": image_size, "context_length": context_length,
                                "mean": mean, "std": std, "background": background,
                                "augment": augment})  # fmt: skip
        super().__init__(
            pre, eval_batch_size, num_workers, pin_memory, persistent_workers, zeroshot,
            max_skipped_fraction, check_images,
        )  # fmt: skip
        _check_positive(
            image_size=image_size, context_length=context_length, batch_size=batch_size,
            eval_batch_size=eval_batch_size, shuffle_buffer=shuffle_buffer,
        )  # fmt: skip
        if dataset_type not in DATASET_TYPES:
            raise ValueError(f"dataset_type must be one of {DATASET_TYPES}, got {dataset_type!r}")
        self.save_hyperparameters(logger=False)
        self.paths = {"train": train_data, "val": val_data, "test": test_data}
        for name, path in (extra_test or {}).items():
            if not path:
                raise ValueError(f"data.extra_test.{name} needs a path (a .csv or .tar)")
            self.paths[f"test_{name}"] = path
        csv_keys = (csv_img_key, csv_caption_key, csv_separator)
        self.sources = {
            split: _source(path, dataset_type, split, csv_keys)
            for split, path in self.paths.items()
            if path
        }
        if self._streams_training and not train_num_samples:
            raise ValueError("data.train_num_samples must be set to stream WebDataset shards")
        self.train_num_samples = train_num_samples
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.seed = seed
        self.augment = pre.augment
        self._datasets: dict[str, PairDataset] = {}
        # Training loaders yield uint8 images; this Normalize finishes them on the device.
        self._train_transform, self._normalize = split_normalize(self._transform(train=True))

    @staticmethod
    def _preprocess(arguments: Mapping) -> Preprocess:
        """open_clip's normalisation (OpenAI's statistics) unless the config gives its own."""
        return Preprocess(
            arguments["image_size"], arguments["context_length"],
            arguments["mean"] or OPENAI_DATASET_MEAN, arguments["std"] or OPENAI_DATASET_STD,
            arguments["background"], arguments["augment"] or {},
        )  # fmt: skip

    def _items(self, split: str) -> list:
        """The usable rows of a split; stops when too few are usable."""
        path = self.paths[split]
        counts = self._counts(split, f"{_data_key(split)}={path}")
        items = self.sources[split].items(counts, self.check_images)
        counts.check(self.max_skipped_fraction)
        return items

    def dataset(self, split: str) -> PairDataset:
        """The pairs of ``split`` (``train`` only for CSV; shards are streamed)."""
        if split not in self.paths:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(self.paths)}")
        if not self.paths[split]:
            raise ValueError(f"{_data_key(split)} is not set")
        if split == "train" and self._streams_training:
            raise ValueError("training shards are streamed: there is no map-style train split")
        if split not in self._datasets:
            self._datasets[split] = PairDataset(
                self._items(split), self._transform(split == "train"), self.image_size,
                tokenizer=self.tokenizer, background=self.background, counts=self.counts[split],
            )  # fmt: skip
        return self._datasets[split]

    def _transform(self, train: bool):
        return build_transform(self.image_size, train, self.mean, self.std, self.augment)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches arrive with uint8 images (the workers stop before the float
        conversion and Normalize, ``split_normalize``): normalised here, on the device the
        Trainer moved them to. Evaluation batches (dicts) are normalised already."""
        if isinstance(batch, (tuple, list)) and batch[0].dtype == torch.uint8:
            return (normalize_images(batch[0], self._normalize), *batch[1:])
        return batch

    def check(self, stages: Sequence[str]) -> None:
        """Read every split the ``stages`` use (CSV rows, shard indexes; of streamed training
        shards, that each is a tar and the first has usable samples), so unusable data stops
        the run before training."""
        for stage in stages:
            if stage == "test" and not (self._test_splits() or self.zeroshot):
                raise ValueError("nothing to test on: set data.test_data or "
                                 "+data.zeroshot.NAME.root (or test=false)")  # fmt: skip
            self.setup(stage)
            if stage == "fit" and self._streams_training:
                train = self.sources["train"]
                train.check_stream("data.train_data", self.max_skipped_fraction, self.check_images)
        super().check(stages)

    @property
    def _streams_training(self) -> bool:
        """Whether training streams its split (shards) rather than reading rows (CSV)."""
        return "train" in self.sources and self.sources["train"].streams

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": self._test_splits()}
        for split in needed.get(stage, tuple(self.paths)):
            if self.paths[split] and not (split == "train" and self._streams_training):
                self.dataset(split)
        if stage == "fit" and not self.paths["train"]:
            raise ValueError("data.train_data is not set: nothing to train on")

    def _test_splits(self) -> tuple[str, ...]:
        """``test`` and the ``extra_test`` splits (``test_<name>``) that have a path."""
        return tuple(s for s, path in self.paths.items() if s.startswith("test") and path)

    def _own_eval_sets(self, stage: str) -> list[EvalSet]:
        splits = self._test_splits() if stage == "test" else ("val",) * bool(self.paths["val"])
        return [EvalSet(s, IndexedSamples(self.dataset(s)), ()) for s in splits]

    def train_dataloader(self) -> DataLoader:
        if not self._streams_training:
            pairs = self.dataset("train").with_transform(self._train_transform)
            return self._train_loader(pairs, self.batch_size, True, self.seed)
        rank, world_size = self._world()
        stream = ShardStream(
            self.sources["train"].urls, self._train_transform, self.tokenizer,
            self.batch_size, self.train_num_samples, rank, world_size,
            self.workers.num_workers, self.seed, self.shuffle_buffer, self.background,
            self._counts("train", f"data.train_data={self.paths['train']}"),
        )  # fmt: skip
        return ResumableLoader(
            stream, batch_size=None, global_step=self._global_step, **self._workers()
        )


DATASET_TYPES = ("auto", "csv", "webdataset")


def _data_key(split: str) -> str:
    """The config key that names a split's path: ``data.test_data``, ``data.extra_test.novel``."""
    if split.startswith("test_"):
        return f"data.extra_test.{split[len('test_') :]}"
    return f"data.{split}_data"


def _source(
    path: str, dataset_type: str, split: str, csv_keys: tuple[str, str, str]
) -> CsvSource | ShardSource:
    """The split's source: of the format ``dataset_type`` names, or for ``auto`` the one its
    file extension tells (``.csv``/``.tsv``, ``.tar``)."""
    name = str(path).split("::")[0].lower()
    if dataset_type == "csv" or (dataset_type == "auto" and name.endswith((".csv", ".tsv"))):
        return CsvSource(path, *csv_keys)
    if dataset_type == "webdataset" or (dataset_type == "auto" and name.endswith(".tar")):
        return ShardSource(path)
    raise ValueError(
        f"{_data_key(split)}={path}: cannot tell its format from the extension (.csv, .tsv or "
        ".tar); set data.dataset_type=csv or webdataset"
    )
