"""Loader throughput: decoded and transformed pairs/s of the training loader for open_clip's
file formats (CSV, WebDataset shards) at several image sizes and worker counts, and whether the
loader keeps up with training: pairs/s of training steps fed by the file loader against the
same steps on a batch already in memory.

The files are ``shapes`` samples written at each size (``limoe-data export``'s writers), so
the benchmark needs no data of its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from statistics import median

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from limoe.data import ImageTextDataModule
from limoe.data.csv import read_csv
from limoe.data.export import csv_pairs
from limoe.data.shapes import export_csv
from limoe.data.webdataset import write_shards

from .step import make_step

SHARDS = 4  # shards per fixture, so up to four workers each read their own


def write_fixture(root: Path, image_size: int, pairs: int) -> dict[str, str]:
    """``pairs`` shapes samples at ``image_size`` px as a CSV and as shards; the path (or
    shard pattern) of each format."""
    folder = root / f"px{image_size}"
    csv_path = export_csv("train", pairs, folder, image_size)
    per_shard = -(-pairs // SHARDS)
    write_shards(csv_pairs(read_csv(csv_path)), str(folder / "shards/%06d.tar"), per_shard)
    return {
        "csv": str(csv_path),
        "webdataset": str(folder / f"shards/{{000000..{SHARDS - 1:06d}}}.tar"),
    }


def endless(loader: DataLoader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def datamodule(path: str, image_size: int, batch_size: int, num_workers: int | None, pairs: int):
    return ImageTextDataModule(
        train_data=path, image_size=image_size, batch_size=batch_size,
        num_workers=num_workers, train_num_samples=pairs, check_images=False,
    )  # fmt: skip


def loader_rate(loader: DataLoader, batches: int, warmup: int = 1) -> float:
    """Pairs/s over ``batches`` batches, after ``warmup`` batches (which start the workers)."""
    batch_iter = endless(loader)
    for _ in range(warmup):
        next(batch_iter)
    start, pairs = time.perf_counter(), 0
    for _ in range(batches):
        pairs += next(batch_iter)[0].shape[0]
    return pairs / (time.perf_counter() - start)


def run_loader_bench(
    root: Path,
    formats: Sequence[str],
    image_sizes: Sequence[int],
    num_workers: Sequence[int],
    batch_size: int,
    batches: int,
    progress: bool = True,
) -> list[dict]:
    """One row per (format, size, workers): pairs/s in total and per worker (the main
    process counts as the one worker when there are none)."""
    pairs = batch_size * (batches + 1)
    rows = []
    cases = [(s, f, w) for s in image_sizes for f in formats for w in num_workers]
    fixtures: dict[int, dict[str, str]] = {}
    for size, fmt, workers in tqdm(cases, desc="limoe-bench data", disable=not progress):
        if size not in fixtures:
            fixtures[size] = write_fixture(root, size, pairs)
        dm = datamodule(fixtures[size][fmt], size, batch_size, workers, pairs)
        rate = loader_rate(dm.train_dataloader(), batches)
        rows.append({"format": fmt, "image_size": size, "num_workers": workers,
                     "batch_size": batch_size, "pairs_per_s": rate,
                     "pairs_per_s_per_worker": rate / max(1, workers)})  # fmt: skip
    return rows


def _steps_rate(step: Callable, batches: Iterator, steps: int, prepare: Callable) -> float:
    start, pairs = time.perf_counter(), 0
    for _ in range(steps):
        images, tokens = prepare(next(batches))
        step(images, tokens)
        pairs += images.shape[0]
    return pairs / (time.perf_counter() - start)


def run_feed_bench(
    module: torch.nn.Module,
    loader: DataLoader,
    warmup: int,
    steps: int,
    rounds: int = 4,
    progress: bool = True,
    prepare: Callable[[tuple], tuple] = lambda batch: batch,
) -> dict:
    """Training pairs/s fed by ``loader`` against the same steps on its first batch held in
    memory: ``rounds`` of (memory, files) blocks of ``steps`` steps; medians over rounds.
    The loader runs on between blocks' steps as it would in training. ``prepare`` finishes
    each batch as the Trainer would (the datamodule's ``on_after_batch_transfer``), in
    both blocks."""
    module.train()
    step = make_step(module, torch.float32)
    batch_iter = endless(loader)
    first = next(batch_iter)
    memory = iter(lambda: first, None)
    _steps_rate(step, memory, warmup, prepare)
    _steps_rate(step, batch_iter, warmup, prepare)
    rates: dict[str, list[float]] = {"memory": [], "files": []}
    for _ in tqdm(range(rounds), desc="limoe-bench data feed", disable=not progress):
        rates["memory"].append(_steps_rate(step, memory, steps, prepare))
        rates["files"].append(_steps_rate(step, batch_iter, steps, prepare))
    memory_rate, files_rate = median(rates["memory"]), median(rates["files"])
    return {
        "batch_size": first[0].shape[0],
        "num_workers": loader.num_workers,
        "memory_pairs_per_s": memory_rate,
        "files_pairs_per_s": files_rate,
        "files_vs_memory": files_rate / memory_rate,
        "rates": rates,
    }
