"""What an evaluation runs, as a datamodule hands it over: for each evaluation loader its
metric prefix, its samples and the zero-shot task of each column of its ``labels``, plus the
tokenizer that turns the tasks' prompts into tokens. Nothing else of the datamodule is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass
class ZeroShotTask:
    """An open_clip-style zero-shot task: class names plus prompt templates with one ``{}``."""

    name: str
    classnames: list[str]
    templates: list[str]

    def prompts(self, classname: str) -> list[str]:
        return [t.format(classname) for t in self.templates]


@dataclass(frozen=True)
class EvalSet:
    """One evaluation loader. Its samples are dicts (``index``, ``image``, ``valid``, and
    ``text`` for retrieval and/or ``labels [len(tasks)]`` for zero-shot); metrics are logged
    as ``{prefix}/image_to_text_R@1``, ``{prefix}/{task}_zeroshot_top1``, ..."""

    prefix: str
    samples: Dataset
    tasks: tuple[ZeroShotTask, ...] = ()  # the task of each column of ``labels``


@dataclass(frozen=True)
class EvalPlan:
    """Every evaluation loader of one stage (in ``dataloader_idx`` order) and the tokenizer."""

    sets: tuple[EvalSet, ...]
    tokenizer: Callable

    @property
    def tasks(self) -> dict[str, ZeroShotTask]:
        """The zero-shot tasks the loaders carry labels for, by name."""
        return {task.name: task for s in self.sets for task in s.tasks}


STAGES = ("fit", "validate", "test")

# The evaluation loaders of the embedded benchmarks (val / test / novel splits) per stage, as
# (split, metric prefix); the order is the dataloader_idx. ``fit`` validates as ``validate``.
SPLIT_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "fit": (("val", "val"),),
    "validate": (("val", "val"),),
    "test": (("test", "test"), ("novel", "test_novel")),
}


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected fit, validate or test")
    return stage
