"""Training-step throughput as ``limoe-train`` runs it: each model's steps go through
Lightning's loop with the run's callbacks, logger, gradient clipping, finite-loss check,
routing statistics, temperature clamp and schedule, on one batch held in memory (so the data
loader is not what is timed). Models are timed in rounds, one after another, so the ratios to
the dense tower compare steps taken in the same spell of the machine."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from statistics import median

import lightning as L
from tqdm.auto import tqdm

from .timing import synchronize


class StepTimes(L.Callback):
    """Seconds between the ends of consecutive training batches: everything the loop does
    for one step (fetch, forward, loss, backward, clipping, optimiser and schedule step,
    callbacks, logging)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        synchronize(trainer.strategy.root_device)
        self.ends.append(time.perf_counter())

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.ends)]


# fit(module, steps) -> the seconds of each step after the first: one model's steps in the
# Lightning loop (limoe.bench.run builds it from the run's config).
Fit = Callable[[int], list[float]]


def run_train_bench(
    fits: Mapping[str, Fit],
    batch_size: int,
    params: Mapping[str, int],
    warmup: int = 3,
    repeats: int = 10,
    rounds: int = 3,
    progress: bool = True,
) -> list[dict]:
    """One row per model: median step seconds over every timed step, pairs/s, and pairs/s as
    a fraction of the ``dense`` model's (when it is among the models): the median over rounds
    of the dense model's median step time over the model's in the same round
    (``round_ratios``), so a slow spell of the machine that spans a round cancels out."""
    if repeats < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"repeats and rounds must be >= 1 and warmup >= 0, "
                         f"got {repeats}, {rounds} and {warmup}")  # fmt: skip
    per_round: dict[str, list[float]] = {name: [] for name in fits}
    times: dict[str, list[float]] = {name: [] for name in fits}
    total = rounds * len(fits)
    with tqdm(total=total, desc="limoe-bench train", unit="fit", disable=not progress) as bar:
        for _ in range(rounds):
            for name, fit in fits.items():
                steps = fit(warmup + repeats + 1)[warmup:]  # +1: the first end starts the clock
                times[name] += steps
                per_round[name].append(median(steps))
                bar.update()
    return [
        {
            "model": name,
            "batch_size": batch_size,
            "median_s": median(times[name]),
            "times_s": times[name],
            "round_median_s": per_round[name],
            "pairs_per_s": batch_size / median(times[name]),
            "pairs_per_s_vs_dense": (
                median(round_ratios(per_round["dense"], per_round[name]))
                if "dense" in per_round
                else None
            ),
            "params": params[name],
        }
        for name in fits
    ]


def round_ratios(reference_s: list[float], model_s: list[float]) -> list[float]:
    """Per round, the model's throughput as a fraction of the reference's: the reference's
    step time over the model's, both timed in that round."""
    return [ref / own for ref, own in zip(reference_s, model_s, strict=True)]


class Repeat:
    """An iterable of the same batch ``steps`` times: a loader with nothing to load. (A list
    of batches would not do: Lightning reads a list as several loaders.)"""

    def __init__(self, batch: object, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return itertools.repeat(self.batch, self.steps)

    def __len__(self) -> int:
        return self.steps


def in_memory(batch: object, steps: int) -> Callable[[], Repeat]:
    """A ``train_dataloader`` that yields the same batch ``steps`` times."""
    return lambda: Repeat(batch, steps)
