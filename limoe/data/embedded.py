"""The embedded procedural benchmarks as datamodules: ``shapes`` and ``scenes``. Their
train split is read in index order, so the curriculum (partial captions from a step on,
training from a step on) is a range of indices (``StepIndex``) and a sampler's start."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from limoe.data import scenes, shapes
from limoe.data.datamodule import PairDataModule, _check_positive
from limoe.data.defaults import with_defaults
from limoe.data.loading import StepIndex
from limoe.data.pairs import IndexedSamples
from limoe.data.preprocess import Preprocess
from limoe.data.procedural import MEAN, STD, ProceduralPairs
from limoe.data.shapes import SPLITS, ShapesDataset
from limoe.eval.plan import SPLIT_PREFIXES, EvalSet


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
            pre, eval_batch_size, num_workers, pin_memory, persistent_workers, zeroshot,
            max_skipped_fraction, check_images,
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
        self.seed = seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size, "novel": novel_size}
        self.batch_size = batch_size
        self.partial_captions = partial_captions  # train split only: eval captions are full
        self.partial_captions_from_step = partial_captions_from_step
        self.train_from_step = train_from_step
        self.hard_negatives = hard_negatives  # train split only: evaluation pairs are i.i.d.
        self.hard_negative_attributes = hard_negative_attributes
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
        first = self._steps().first(self.partial_captions_from_step)
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
            for split, _ in SPLIT_PREFIXES.get(stage_key, ()):
                self.dataset(split)

    def _own_eval_sets(self, stage: str) -> list[EvalSet]:
        tasks = tuple(self.zeroshot_tasks().values())
        return [
            EvalSet(prefix, IndexedSamples(self.dataset(split)), tasks)
            for split, prefix in SPLIT_PREFIXES[stage]
        ]

    def probe_sets(self, probe: Mapping) -> tuple[IndexedSamples, IndexedSamples, int]:
        """``probe.task``: the first ``probe.train_size`` images of the train split (i.i.d.,
        without the hard-negative groups) and the test split, classed by that zero-shot
        task's labels; else ImageFolder trees, as every datamodule."""
        task = probe.get("task")
        if not task:
            return super().probe_sets(probe)
        names = self.dataset_class.task_names
        if task not in names:
            raise ValueError(f"probe.task={task}: this data's tasks are {', '.join(names)}")
        train = self.dataset_class(
            "train", probe["train_size"], image_size=self.image_size, seed=self.seed,
            tokenizer=self.tokenizer, return_labels=True,
        )  # fmt: skip
        return IndexedSamples(train), IndexedSamples(self.dataset("test")), names.index(task)

    def train_dataloader(self) -> DataLoader:
        self._warn_if_split_wraps()
        # Read in order: samples are i.i.d. draws already, and the order keeps the curriculum.
        train = self.dataset("train")
        start = self._steps().first(self.train_from_step)
        if start >= len(train):
            raise ValueError(f"train_from_step={self.train_from_step} starts past the end "
                             f"of the train split (train_size={len(train)})")  # fmt: skip
        return self._train_loader(train, self.batch_size, False, self.seed, start)

    def _steps(self) -> StepIndex:
        """Which train indices each step reads: one ``batch_size`` per step and process."""
        return StepIndex(self.batch_size, self._world()[1])

    def _warn_if_split_wraps(self) -> None:
        """The curriculum lives in the sample order, so a run longer than one pass over the
        train split starts it again (full captions only) when the split runs out."""
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        steps_per_pass = self._steps().steps_per_pass(self.sizes["train"])
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
