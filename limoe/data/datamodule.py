"""The base of every LightningDataModule of limoe (``PairDataModule``): zero-shot tasks from
ImageFolder trees, dict evaluation loaders, the worker policy and resumable training loaders.
The data sources build on it, each owning its reading: the embedded benchmarks
(``limoe.data.embedded``) and open_clip's file formats (``limoe.data.files``).

Plain keyword arguments only, so Hydra builds them straight from ``conf/data/*.yaml``; their
defaults are that YAML's values (a test keeps them equal). Evaluation loaders yield dicts
(``index``, ``image``, ``text`` for pairs, ``labels`` for zero-shot tasks, ``valid``).
``eval_plan(stage)`` hands the evaluation over: each loader's metric prefix, samples and
zero-shot tasks, and the tokenizer (``limoe.eval.EvalPlan``); the run builder gives it to the
LightningModule.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from limoe.data.imagefolder import imagefolder_eval_set
from limoe.data.loading import ResumableLoader, ResumableSampler, WorkerPolicy
from limoe.data.preprocess import Preprocess
from limoe.data.skips import SkipCounts
from limoe.data.transforms import build_transform
from limoe.eval.plan import EvalPlan, EvalSet, check_stage


class PairDataModule(L.LightningDataModule):
    """What every datamodule shares: zero-shot tasks from ImageFolder trees
    (``zeroshot: {NAME: {root: DIR, templates: [...]}}``, evaluated at test time), dict
    evaluation loaders, and ``ResumableLoader`` for training."""

    def __init__(
        self,
        preprocess: Preprocess,
        eval_batch_size: int,
        num_workers: int | None,
        pin_memory: bool | None,
        persistent_workers: bool | None,
        zeroshot: Mapping | None,
        max_skipped_fraction: float = 0.5,
        check_images: bool = True,
    ) -> None:
        """``preprocess``: what the subclass applies (its ``_preprocess`` of its arguments)."""
        super().__init__()
        self.workers = WorkerPolicy.of(num_workers, pin_memory, persistent_workers)
        if not 0 <= max_skipped_fraction <= 1:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
        self.max_skipped_fraction = max_skipped_fraction
        self.check_images = check_images
        # Samples read and left out per split (and ImageFolder task), for metrics.json.
        self.counts: dict[str, SkipCounts] = {}
        self.preprocess = preprocess
        self.image_size, self.context_length = preprocess.image_size, preprocess.context_length
        self.mean, self.std, self.background = (
            preprocess.mean,
            preprocess.std,
            preprocess.background,
        )
        self.tokenizer = preprocess.tokenizer()
        self.eval_batch_size = eval_batch_size
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
            self._folder_sets = [
                imagefolder_eval_set(
                    name,
                    spec,
                    self._eval_transform(),
                    self.image_size,
                    self.background,
                    self._counts(name, f"data.zeroshot.{name}.root={spec['root']}"),
                    self.check_images,
                    self.max_skipped_fraction,
                )  # fmt: skip
                for name, spec in self.zeroshot.items()
            ]
        return self._folder_sets

    def probe_sets(self, probe: Mapping) -> tuple[Dataset, Dataset, int]:
        """The train and test samples of a linear probe (dicts with ``image``, ``labels``,
        ``valid``) and the column of ``labels`` that holds the class: ``probe.train`` and
        ``probe.test``, ImageFolder trees with the same class folders."""
        roots = {split: probe.get(split) for split in ("train", "test")}
        if not all(roots.values()):
            raise ValueError("probe: give probe.train and probe.test, ImageFolder trees "
                             "(the embedded data also takes probe.task)")  # fmt: skip
        sets = {
            split: imagefolder_eval_set(
                f"probe_{split}",
                {"root": root},
                self._eval_transform(),
                self.image_size,
                self.background,
                self._counts(f"probe_{split}", f"probe.{split}={root}"),
                self.check_images,
                self.max_skipped_fraction,
                key=f"probe.{split}",
            )  # fmt: skip
            for split, root in roots.items()
        }
        train, test = (sets[s].tasks[0].classnames for s in ("train", "test"))
        if train != test:
            raise ValueError(f"probe.train and probe.test must hold the same class folders: "
                             f"{len(train)} and {len(test)} classes, {train[:3]} ...")  # fmt: skip
        return sets["train"].samples, sets["test"].samples, 0

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
        check_stage(stage)
        folders = self.folder_sets() if stage == "test" else []
        return EvalPlan(tuple(self._own_eval_sets(stage) + folders), self.tokenizer)

    def _workers(self) -> dict:
        """The DataLoader options on worker processes (``WorkerPolicy``), shared by every loader."""
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return self.workers.options(on_gpu)

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

    def _train_loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, start: int = 0
    ):
        """A resumable training loader over a map-style dataset (its indices from ``start``
        on), split across processes."""
        rank, world_size = self._world()
        sampler = ResumableSampler(
            dataset, batch_size, start, num_replicas=world_size, rank=rank, shuffle=shuffle,
            seed=seed,
        )  # fmt: skip
        return ResumableLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
            global_step=self._global_step, **self._workers(),
        )  # fmt: skip


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
