"""Wall-clock timing that is fair between the things compared: warm-up calls, then repeats
taken round-robin (a, b, c, a, b, c, ...) so a slow spell of the machine hits every
contender alike; the median is what is reported."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: torch.device | str = "cpu",
    on_round: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` times each, after ``warmup`` calls each;
    ``on_round`` is called after each round of calls (a progress bar's ``update``)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
        if on_round is not None:
            on_round()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round()
    return times
