"""Loading pairs: a fixed collated batch (``first_pairs``), the worker policy every loader
shares, the step-to-index arithmetic of in-order training (``StepIndex``), and training loaders
that resume mid-epoch where a checkpoint left off.

Lightning saves the ``state_dict`` of a training DataLoader that has one, and hands it back
before the first ``iter()`` of a resumed run. ``ResumableLoader``'s state is the epoch and the
number of its batches already trained on; on resume it asks its sampler (map-style data) or
its dataset (streams) to start after them, so a resumed run sees the batches the interrupted
one would have seen. Without this, Lightning restarts the epoch's data from its first batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate


def collate_pairs(dataset: Dataset, indices: Iterable[int]) -> tuple[Tensor, Tensor]:
    """``(images, tokens)`` of the pairs at ``indices``, collated into one batch: the first two
    fields of each item, whatever else the dataset returns (labels, ...)."""
    return tuple(default_collate([dataset[i][:2] for i in indices]))


def first_pairs(dataset: Dataset, num_pairs: int) -> tuple[Tensor, Tensor]:
    """The first ``num_pairs`` pairs of ``dataset`` (all of them if it is smaller), collated:
    the fixed batch that FLOP counts, routing records and benchmarks use."""
    return collate_pairs(dataset, range(min(num_pairs, len(dataset))))


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


@dataclass(frozen=True)
class WorkerPolicy:
    """The DataLoader options on worker processes, shared by every loader of a datamodule.

    ``num_workers`` None: one per spare core (``default_workers``); ``pin_memory`` None: when
    training runs on a GPU; ``persistent_workers`` None: kept between epochs (there is no
    reason to restart them) whenever there are workers."""

    num_workers: int
    pin_memory: bool | None
    persistent_workers: bool

    @classmethod
    def of(
        cls, num_workers: int | None, pin_memory: bool | None, persistent_workers: bool | None
    ) -> WorkerPolicy:
        if num_workers is not None and num_workers < 0:
            raise ValueError(
                f"num_workers must be >= 0 or null (one per spare core), got {num_workers}"
            )
        workers = default_workers() if num_workers is None else num_workers
        return cls(workers, pin_memory, persistent_workers is not False and workers > 0)

    def options(self, on_gpu: bool) -> dict:
        pin = on_gpu if self.pin_memory is None else self.pin_memory
        return {"num_workers": self.num_workers, "pin_memory": pin,
                "persistent_workers": self.persistent_workers}  # fmt: skip


@dataclass(frozen=True)
class StepIndex:
    """Training reads the train split in index order, one ``batch_size`` per step on each of
    ``world_size`` processes, so each step reads a known range of indices. The embedded
    benchmarks' curriculum lives in that order (partial captions from an index on, training
    from a step on): this is its arithmetic, in one place."""

    batch_size: int
    world_size: int = 1

    def first(self, step: int) -> int:
        """The first train index that ``step`` reads."""
        return step * self.batch_size * self.world_size

    def steps_per_pass(self, size: int) -> int:
        """Steps in one pass over a split of ``size`` samples."""
        return size // self.first(1)


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (also for one process: Lightning leaves it in place under
    DDP) that can start an epoch after its first ``batches`` batches of ``batch_size``, over
    the indices from ``start`` on (a curriculum's later steps, ``StepIndex.first``)."""

    def __init__(self, dataset: Dataset, batch_size: int, start: int = 0, **kwargs) -> None:
        if not 0 <= start < len(dataset):
            raise ValueError(f"start must be in [0, {len(dataset)}), got {start}")
        super().__init__(range(start, len(dataset)), **kwargs)
        self.start = start
        self.batch_size = batch_size
        self._skip = 0

    def resume_at(self, epoch: int, batches: int) -> None:
        self.set_epoch(epoch)
        self._skip = batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        indices = [self.start + i for i in super().__iter__()][self._skip :]
        self._skip = 0  # the next epoch starts from its beginning
        return iter(indices)


class ResumableLoader(DataLoader):
    """A training DataLoader whose position Lightning checkpoints.

    ``global_step`` reads the trainer's optimiser step count, which Lightning restores exactly;
    the batches of this epoch done are the steps since the epoch's first ``iter()``
    (one batch per step: gradient accumulation is not supported by this count).
    """

    def __init__(self, *args, global_step: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.global_step = global_step or (lambda: 0)
        self.epoch = -1  # the epoch being read; the first iter() starts epoch 0
        self._resume: tuple[int, int] | None = None
        self._epoch_start_step = 0

    def __iter__(self):
        epoch, batches = self._resume or (self.epoch + 1, 0)
        self._resume = None
        self.epoch = epoch
        self._epoch_start_step = self.global_step() - batches
        for target in (self.sampler, self.dataset):
            if hasattr(target, "resume_at"):
                target.resume_at(epoch, batches)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.global_step() - self._epoch_start_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))
