"""Loading pairs: a fixed collated batch (``first_pairs``), and training loaders that resume
mid-epoch where a checkpoint left off.

Lightning saves the ``state_dict`` of a training DataLoader that has one, and hands it back
before the first ``iter()`` of a resumed run. ``ResumableLoader``'s state is the epoch and the
number of its batches already trained on; on resume it asks its sampler (map-style data) or
its dataset (streams) to start after them, so a resumed run sees the batches the interrupted
one would have seen. Without this, Lightning restarts the epoch's data from its first batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

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


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (also for one process: Lightning leaves it in place under
    DDP) that can start an epoch after its first ``batches`` batches of ``batch_size``."""

    def __init__(self, dataset: Dataset, batch_size: int, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.batch_size = batch_size
        self._skip = 0

    def resume_at(self, epoch: int, batches: int) -> None:
        self.set_epoch(epoch)
        self._skip = batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self._skip :]
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
