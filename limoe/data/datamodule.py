"""LightningDataModules: the embedded shapes dataset, and image-caption files in open_clip's
formats (CSV, WebDataset shards), with zero-shot tasks from ImageFolder trees.

Plain keyword arguments only, so Hydra builds them straight from ``conf/data/*.yaml``; their
defaults are that YAML's values (a test keeps them equal). Both
share ``PairDataModule``: training loaders that resume mid-epoch, and evaluation loaders that
yield dicts (``index``, ``image``, ``text`` for pairs, ``labels`` for zero-shot tasks,
``valid``). ``eval_plan(stage)`` hands the evaluation over: each loader's metric prefix,
samples and zero-shot tasks, and the tokenizer (``limoe.eval.EvalPlan``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from torch.utils.data import DataLoader, Dataset, Subset

from limoe.data import scenes, shapes
from limoe.data.csv import read_csv
from limoe.data.defaults import with_defaults
from limoe.data.imagefolder import imagefolder_task
from limoe.data.loading import ResumableLoader, ResumableSampler
from limoe.data.pairs import (
    WHITE,
    IndexedSamples,
    PairDataset,
    build_transform,
    normalize_images,
    split_normalize,
)
from limoe.data.preprocess import Preprocess
from limoe.data.procedural import MEAN, STD, ProceduralPairs
from limoe.data.shapes import SPLITS, ShapesDataset
from limoe.data.skips import SkipCounts
from limoe.data.webdataset import ShardStream, check_tars, expand_urls, index_shards
from limoe.eval.plan import EvalPlan, EvalSet

# Loader workers when data.num_workers is null: decoding keeps pace with one spare core on the
# small images limoe trains on (limoe-bench suite=data); more only contend with the model.
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """One worker per core beyond the first (which trains), at least one, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores - 1))


def _pair_sample(dataset: PairDataset, i: int) -> dict:
    return dataset.sample(i)


def _procedural_sample(dataset: ProceduralPairs, i: int) -> dict:
    image, tokens, labels = dataset[i]
    return {"image": image, "text": tokens, "labels": labels, "valid": torch.tensor(True)}


class PairDataModule(L.LightningDataModule):
    """What every datamodule shares: zero-shot tasks from ImageFolder trees
    (``zeroshot: {NAME: {root: DIR, templates: [...]}}``, evaluated at test time), dict
    evaluation loaders, and ``ResumableLoader`` for training."""

    def __init__(
        self,
        image_size: int,
        eval_batch_size: int,
        num_workers: int | None,
        pin_memory: bool | None,
        persistent_workers: bool | None,
        zeroshot: Mapping | None,
        mean: Sequence[float],
        std: Sequence[float],
        background: Sequence[int] = WHITE,
        max_skipped_fraction: float = 0.5,
        check_images: bool = True,
    ) -> None:
        super().__init__()
        if num_workers is not None and num_workers < 0:
            raise ValueError(
                f"num_workers must be >= 0 or null (one per spare core), got {num_workers}"
            )
        if not 0 <= max_skipped_fraction <= 1:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
        self.max_skipped_fraction = max_skipped_fraction
        self.check_images = check_images
        # Samples read and left out per split (and ImageFolder task), for metrics.json.
        self.counts: dict[str, SkipCounts] = {}
        self.image_size = image_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.pin_memory = pin_memory  # null: when the trainer runs on a GPU
        # null: kept between epochs, as there is no reason to restart them.
        self.persistent_workers = persistent_workers is not False and self.num_workers > 0
        self.mean, self.std, self.background = tuple(mean), tuple(std), tuple(background)
        for name, spec in (zeroshot or {}).items():
            if not isinstance(spec, Mapping) or not spec.get("root"):
                raise ValueError(f"data.zeroshot.{name} needs a root (an ImageFolder directory)")
        self.zeroshot = {name: dict(spec) for name, spec in (zeroshot or {}).items()}
        self._folder_sets: list[EvalSet] | None = None

    @classmethod
    def preprocess_of(cls, data: Mapping) -> Preprocess:
        """The preprocessing this class applies with the arguments of ``data`` (a data config;
        what it leaves out takes the constructor's default), without building it."""
        names = inspect.signature(cls).parameters
        bound = inspect.signature(cls).bind_partial(**{k: v for k, v in data.items() if k in names})
        bound.apply_defaults()
        return cls._preprocess(bound.arguments)

    # --- to be given by each datamodule ----------------------------------------------------

    @staticmethod
    def _preprocess(arguments: Mapping) -> Preprocess:
        """The preprocessing of the constructor's ``arguments``."""
        raise NotImplementedError

    def _own_eval_sets(self, stage: str) -> list[EvalSet]:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    def _eval_transform(self):
        return build_transform(self.image_size, train=False, mean=self.mean, std=self.std)

    def folder_sets(self) -> list[EvalSet]:
        """One test loader per ImageFolder task, built on first use."""
        if self._folder_sets is None:
            self._folder_sets = []
            for name, spec in self.zeroshot.items():
                counts = self._counts(name, f"data.zeroshot.{name}.root={spec['root']}")
                task, items, labels = imagefolder_task(
                    name, spec["root"], spec.get("templates"), counts, self.check_images
                )
                counts.check(self.max_skipped_fraction)
                dataset = PairDataset(
                    items, self._eval_transform(), self.image_size, labels=labels,
                    background=self.background, counts=counts,
                )  # fmt: skip
                self._folder_sets.append(
                    EvalSet("test", IndexedSamples(dataset, _pair_sample), (task,))
                )
        return self._folder_sets

    def _counts(self, split: str, where: str) -> SkipCounts:
        if split not in self.counts:
            self.counts[split] = SkipCounts(where)
        return self.counts[split]

    def check(self, stages: Sequence[str]) -> None:
        """Read the files the ``stages`` (``fit``, ``test``) will use, so that unusable data
        stops a run before it trains rather than after. The embedded data has only the
        ImageFolder tasks to read."""
        if "test" in stages:
            self.folder_sets()

    def skip_totals(
        self, sum_loaded: Callable[[list[int]], list[int]] = list
    ) -> dict[str, dict[str, int]]:
        """Per split read (and ImageFolder task): ``rows`` and ``skipped_<reason>``;
        ``sum_loaded`` sums the tallies found while loading over processes (under DDP)."""
        return {split: c.totals(sum_loaded(c.loaded())) for split, c in self.counts.items()}

    def eval_plan(self, stage: str) -> EvalPlan:
        """What ``stage`` (``fit`` or ``validate``: the val loaders; ``test``) evaluates: its
        loaders, in ``dataloader_idx`` order, and the tokenizer for the zero-shot prompts."""
        if stage not in ("fit", "validate", "test"):
            raise ValueError(f"unknown stage {stage!r}; expected fit, validate or test")
        folders = self.folder_sets() if stage == "test" else []
        return EvalPlan(tuple(self._own_eval_sets(stage) + folders), self.tokenizer)

    def _workers(self) -> dict:
        """The DataLoader options on worker processes, shared by every loader."""
        pin = self.pin_memory
        if pin is None:
            pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return {
            "num_workers": self.num_workers,
            "pin_memory": pin,
            "persistent_workers": self.persistent_workers,
        }

    def _eval_loader(self, samples: Dataset) -> DataLoader:
        return DataLoader(
            samples, batch_size=self.eval_batch_size, shuffle=False, **self._workers()
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(s.samples) for s in self.eval_plan("validate").sets]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(s.samples) for s in self.eval_plan("test").sets]

    def _world(self) -> tuple[int, int]:
        """(rank, world size) of this process (0, 1 outside a Trainer)."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _global_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def _train_loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int):
        """A resumable training loader over a map-style dataset, split across processes."""
        rank, world_size = self._world()
        sampler = ResumableSampler(
            dataset, batch_size, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
        )
        return ResumableLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
            global_step=self._global_step, **self._workers(),
        )  # fmt: skip


# Evaluation loaders per stage, as (split, metric prefix); the order is the dataloader_idx.
_SHAPES_EVAL: dict[str, tuple[tuple[str, str], ...]] = {
    "fit": (("val", "val"),),
    "validate": (("val", "val"),),
    "test": (("test", "test"), ("novel", "test_novel")),
}


class ShapesDataModule(PairDataModule):
    """Train/val/test/novel loaders over ShapesDataset, sharing one tokenizer.

    Also the base of the other embedded procedural data (``ScenesDataModule``): a subclass
    names its ``dataset_class`` and ``zeroshot_tasks`` and its own defaults."""

    dataset_class: type[ProceduralPairs] = ShapesDataset
    zeroshot_tasks = staticmethod(shapes.zeroshot_tasks)

    def __init__(
        self,
        image_size: int = 32,
        context_length: int = 24,
        seed: int = 0,
        train_size: int = 256_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        novel_size: int = 1_000,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        partial_captions: float = 0.5,
        partial_captions_from_step: int = 400,
        train_from_step: int = 0,
        hard_negatives: float = 1.0,
        hard_negative_attributes: Sequence[str] = ("shape", "position"),
        zeroshot: Mapping | None = None,
        max_skipped_fraction: float = 0.5,
        check_images: bool = True,
    ) -> None:
        pre = self._preprocess({"image_size": image_size, "context_length": context_length})
        super().__init__(
            image_size, eval_batch_size, num_workers, pin_memory, persistent_workers, zeroshot,
            pre.mean, pre.std, pre.background, max_skipped_fraction, check_images,
        )  # fmt: skip
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
        for key, value in (
            ("partial_captions_from_step", partial_captions_from_step),
            ("train_from_step", train_from_step),
        ):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        group = 1 << len(hard_negative_attributes)
        if hard_negatives > 0 and batch_size % group:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of the hard-negative group size "
                f"({group} = 2 ** len(hard_negative_attributes)), so groups never span batches"
            )
        self.save_hyperparameters(logger=False)
        self.context_length = context_length
        self.seed = seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size, "novel": novel_size}
        self.batch_size = batch_size
        self.partial_captions = partial_captions  # train split only: eval captions are full
        self.partial_captions_from_step = partial_captions_from_step
        self.train_from_step = train_from_step
        self.hard_negatives = hard_negatives  # train split only: evaluation pairs are i.i.d.
        self.hard_negative_attributes = hard_negative_attributes
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self._datasets: dict[str, ProceduralPairs] = {}

    @staticmethod
    def _preprocess(arguments: Mapping) -> Preprocess:
        """The procedural images are drawn at ``image_size``, normalised with their own
        statistics, never augmented."""
        return Preprocess(arguments["image_size"], arguments["context_length"], MEAN, STD)

    def dataset(self, split: str) -> ProceduralPairs:
        """The dataset of one split, built on first use (cheap: attributes are hashed)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._datasets:
            self._datasets[split] = self.dataset_class(
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
        first = self._first_index(self.partial_captions_from_step)
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
            for split, _ in _SHAPES_EVAL.get(stage_key, ()):
                self.dataset(split)

    def _own_eval_sets(self, stage: str) -> list[EvalSet]:
        tasks = tuple(self.zeroshot_tasks().values())
        return [
            EvalSet(prefix, IndexedSamples(self.dataset(split), _procedural_sample), tasks)
            for split, prefix in _SHAPES_EVAL[stage]
        ]

    def train_dataloader(self) -> DataLoader:
        self._warn_if_split_wraps()
        # Read in order: samples are i.i.d. draws already, and the order keeps the curriculum.
        train = self.dataset("train")
        start = self._first_index(self.train_from_step)
        if start:
            if start >= len(train):
                raise ValueError(f"train_from_step={self.train_from_step} starts past the end "
                                 f"of the train split (train_size={len(train)})")  # fmt: skip
            train = Subset(train, range(start, len(train)))
        return self._train_loader(train, self.batch_size, False, self.seed)

    def _first_index(self, step: int) -> int:
        """The first train sample of ``step``: one ``batch_size`` per step and process."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return step * self.batch_size * world_size

    def _warn_if_split_wraps(self) -> None:
        """The curriculum lives in the sample order, so a run longer than one pass over the
        train split starts it again (full captions only) when the split runs out."""
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        steps_per_pass = self.sizes["train"] // self._first_index(1)
        last = self.train_from_step + max_steps
        if last > steps_per_pass:
            rank_zero_warn(
                f"data.train_size={self.sizes['train']} lasts {steps_per_pass} steps but "
                f"train_from_step + max_steps={last}: later steps re-read the split from the "
                "start (captions full again); raise data.train_size to keep the curriculum"
            )


class ScenesDataModule(ShapesDataModule):
    """The ``scenes`` benchmark (``limoe.data.scenes``): two objects in a relation per 56 px
    image, 49 patches against a 16-token caption context; same splits, curriculum and loaders
    as ``shapes``, with binding and shape edits as hard negatives."""

    dataset_class = scenes.ScenesDataset
    zeroshot_tasks = staticmethod(scenes.zeroshot_tasks)

    # Shapes' constructor with the scenes' defaults (its signature, not a copy of it).
    __init__ = with_defaults(
        ShapesDataModule.__init__,
        image_size=56,
        context_length=16,
        hard_negative_attributes=("binding", "shape"),
    )


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
            image_size, eval_batch_size, num_workers, pin_memory, persistent_workers, zeroshot,
            pre.mean, pre.std, pre.background, max_skipped_fraction, check_images,
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
        self.kinds = {
            split: _data_kind(path, dataset_type, split)
            for split, path in self.paths.items()
            if path
        }
        if self.kinds.get("train") == "webdataset" and not train_num_samples:
            raise ValueError("data.train_num_samples must be set to stream WebDataset shards")
        self.csv_keys = (csv_img_key, csv_caption_key, csv_separator)
        self.train_num_samples = train_num_samples
        self.shuffle_buffer = shuffle_buffer
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed
        self.augment = dict(augment or {})
        self.tokenizer = SimpleTokenizer(context_length=context_length)
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
        if self.kinds[split] == "csv":
            items = read_csv(path, *self.csv_keys, counts=counts, check_images=self.check_images)
        else:
            items = index_shards(expand_urls(path), counts, self.check_images)
        counts.check(self.max_skipped_fraction)
        return items

    def dataset(self, split: str) -> PairDataset:
        """The pairs of ``split`` (``train`` only for CSV; shards are streamed)."""
        if split not in self.paths:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(self.paths)}")
        if not self.paths[split]:
            raise ValueError(f"{_data_key(split)} is not set")
        if split == "train" and self.kinds[split] == "webdataset":
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
            if stage == "fit" and self.kinds["train"] == "webdataset":
                self._check_train_shards()
        super().check(stages)

    def _check_train_shards(self) -> None:
        """Streamed shards are not read up front: each must be a tar, and the first must
        hold usable samples (a stream of bad ones would draw shards for ever)."""
        urls = expand_urls(self.paths["train"])
        check_tars(urls, f"data.train_data={self.paths['train']}")
        first = SkipCounts(f"data.train_data={urls[0]}")
        index_shards(urls[:1], first, self.check_images)
        first.check(self.max_skipped_fraction)

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": self._test_splits()}
        for split in needed.get(stage, tuple(self.paths)):
            if self.paths[split] and not (split == "train" and self.kinds[split] == "webdataset"):
                self.dataset(split)
        if stage == "fit" and not self.paths["train"]:
            raise ValueError("data.train_data is not set: nothing to train on")

    def _test_splits(self) -> tuple[str, ...]:
        """``test`` and the ``extra_test`` splits (``test_<name>``) that have a path."""
        return tuple(s for s, path in self.paths.items() if s.startswith("test") and path)

    def _own_eval_sets(self, stage: str) -> list[EvalSet]:
        splits = self._test_splits() if stage == "test" else ("val",) * bool(self.paths["val"])
        return [EvalSet(s, IndexedSamples(self.dataset(s), _pair_sample), ()) for s in splits]

    def train_dataloader(self) -> DataLoader:
        if self.kinds["train"] == "csv":
            pairs = self.dataset("train").with_transform(self._train_transform)
            return self._train_loader(pairs, self.batch_size, True, self.seed)
        rank, world_size = self._world()
        stream = ShardStream(
            expand_urls(self.paths["train"]), self._train_transform, self.tokenizer,
            self.batch_size, self.train_num_samples, rank, world_size,
            self.num_workers, self.seed, self.shuffle_buffer, self.background,
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


def _data_kind(path: str, dataset_type: str, split: str) -> str:
    """``csv`` or ``webdataset``: as given, or from the file extension for ``auto``."""
    if dataset_type != "auto":
        return dataset_type
    name = str(path).split("::")[0].lower()
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith(".tar"):
        return "webdataset"
    raise ValueError(
        f"{_data_key(split)}={path}: cannot tell its format from the extension (.csv, .tsv or "
        ".tar); set data.dataset_type=csv or webdataset"
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
