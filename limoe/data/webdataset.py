"""WebDataset tar shards (open_clip's large-scale format): streaming training, indexed
evaluation, and writing shards.

Training streams samples the way open_clip's ``--dataset-resampled`` does: each process and
worker draws shards with replacement, shuffles samples in a buffer and batches them; an epoch
is ``train_num_samples`` pairs over all processes. Every draw is seeded by (seed, epoch, rank,
worker), so an epoch can be replayed, and a resumed run skips the batches it already trained
on. Evaluation reads shards by member offset (``index_shards``), as a map-style dataset, so
every pair is evaluated exactly once whatever the number of processes.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing as mp
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import ClassVar

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from limoe.data.images import IMAGE_EXTENSIONS, WHITE, TarMember, keep_readable, open_image
from limoe.data.skips import SkipCounts, UnusableDataError

log = logging.getLogger("limoe.data")


def expand_urls(patterns: str | Sequence[str]) -> list[str]:
    """Shard paths from brace patterns (``shards/{000000..000099}.tar``), several patterns
    joined by ``::`` as open_clip does; every shard must exist."""
    if isinstance(patterns, str):
        patterns = patterns.split("::")
    urls = [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]
    missing = [url for url in urls if not Path(url).is_file()]
    if not urls or missing:
        raise ValueError(f"no shard file {missing[0] if missing else patterns!r}")
    return urls


class BadSample(ValueError):
    """A streamed sample that cannot be used, with its ``reason`` (one of ``REASONS``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Bad samples in a row after which a training stream stops (no usable shard in sight).
MAX_BAD_IN_A_ROW = 1000


def log_and_continue(error: Exception) -> bool:
    """webdataset's error handler, as in open_clip: log the bad sample and go on."""
    log.warning("skipping sample: %r", error)
    return True


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's member naming: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass(frozen=True)
class ShardSource:
    """A split in WebDataset tar shards (``shards/{000000..000099}.tar``): indexed for random
    access in evaluation (``items``), streamed in training (``ShardStream`` over ``urls``)."""

    path: str
    streams: ClassVar[bool] = True  # training streams the shards

    @property
    def urls(self) -> list[str]:
        return expand_urls(self.path)

    def items(self, counts: SkipCounts, check_images: bool = True) -> list[tuple[TarMember, str]]:
        """The usable ``(image member, caption)`` samples, the others counted in ``counts``."""
        return index_shards(self.urls, counts, check_images)

    def check_stream(self, key: str, max_skipped_fraction: float, check_images: bool) -> None:
        """Streamed shards are not read up front: each must be a tar, and the first must
        hold usable samples (a stream of bad ones would draw shards for ever)."""
        urls = self.urls
        check_tars(urls, f"{key}={self.path}")
        first = SkipCounts(f"{key}={urls[0]}")
        index_shards(urls[:1], first, check_images)
        first.check(max_skipped_fraction)


def check_tars(urls: Sequence[str], key: str) -> None:
    """Every shard must be a tar archive: webdataset would skip a shard that is not, and a
    stream of such shards would draw them forever."""
    for url in urls:
        if not tarfile.is_tarfile(url):
            raise UnusableDataError(f"{key}: shard {url} is not a tar archive")


def index_shards(
    urls: Sequence[str], counts: SkipCounts | None = None, check_images: bool = True
) -> list[tuple[TarMember, str]]:
    """``(image member, caption)`` of every sample of the shards, in shard order; samples
    without an image, with an empty caption or one that is not UTF-8, or (``check_images``)
    whose image PIL cannot identify are logged, counted in ``counts`` and left out."""
    counts = counts if counts is not None else SkipCounts(f"shards {urls[0]}..")
    check_tars(urls, counts.where)
    items = []
    for url in urls:
        with tarfile.open(url) as tar:
            for key, files in _samples(tar).items():
                image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
                if image is None:
                    counts.rows += 1
                    counts.skip("missing_file", f"{url}:{key}", "no image member")
                    continue
                source = TarMember(url, image.offset_data, image.size, image.name)
                try:
                    caption = _read_text(tar, files["txt"]) if "txt" in files else ""
                except UnicodeDecodeError as error:
                    counts.rows += 1
                    counts.skip("unreadable_row", source, f"caption is not UTF-8: {error}")
                    continue
                items.append((source, caption))
    return keep_readable(items, counts, check_images=check_images)


def _samples(tar: tarfile.TarFile) -> dict[str, dict[str, tarfile.TarInfo]]:
    """The members of a tar grouped by sample key, then by extension."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in tar.getmembers():
        if member.isfile():
            key, ext = _split_key(member.name)
            samples.setdefault(key, {})[ext] = member
    return samples


def _read_text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    return tar.extractfile(member).read().decode("utf-8")


class ShardStream(IterableDataset):
    """Batches ``(images [B,3,H,W], tokens [B,L])`` streamed from shards; ``len()`` is the
    number of batches this process reads per epoch."""

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable,
        tokenizer: Callable,
        batch_size: int,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        background: tuple[int, int, int] = WHITE,
        counts: SkipCounts | None = None,
    ) -> None:
        batches = num_samples // (batch_size * world_size)
        if batches < 1:
            raise ValueError(
                f"train_num_samples={num_samples} is less than one batch of {batch_size} pairs "
                f"on each of {world_size} processes"
            )
        self.urls = list(urls)
        self.transform = transform
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.background = tuple(background)
        self.workers = max(1, num_workers)
        self.batches_per_worker = math.ceil(batches / self.workers)
        # (epoch, batches to skip): shared with worker processes, also persistent ones.
        self._position = mp.Array("q", [0, 0])
        self.counts = counts or SkipCounts("shards")

    def __len__(self) -> int:
        return self.batches_per_worker * self.workers

    def resume_at(self, epoch: int, batches: int) -> None:
        self._position[0], self._position[1] = epoch, batches

    def _shards(self, rng: random.Random) -> Iterator[dict[str, str]]:
        while True:
            yield {"url": rng.choice(self.urls)}

    def _pair(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if image is None:
            raise BadSample("missing_file", f"{where} has no {'/'.join(IMAGE_EXTENSIONS)} image")
        try:
            caption = sample.get("txt", b"").decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise BadSample("unreadable_row", f"{where}: caption is not UTF-8 ({error})") from None
        if not caption:
            raise BadSample("empty_caption", f"{where} has an empty caption")
        try:
            pixels = self.transform(open_image(image, self.background))
        except Exception as error:  # PIL raises many types for broken files
            raise BadSample("undecodable", f"{where}: unreadable image ({error})") from error
        return pixels, self.tokenizer([caption])[0]

    def _pairs(self, samples: Iterable[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decoded pairs; each bad sample is logged and counted. After ``MAX_BAD_IN_A_ROW``
        bad samples and no good one the stream stops, rather than draw shards forever."""
        bad_in_a_row = 0
        for sample in samples:
            self.counts.loaded_row()
            try:
                pair = self._pair(sample)
            except BadSample as error:
                self.counts.skip_loaded(error.reason)
                log.warning("skipping sample: %s", error)
                bad_in_a_row += 1
                if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                    raise UnusableDataError(
                        f"{self.counts.where}: {bad_in_a_row} samples in a row were unusable "
                        f"(the last: {error})"
                    ) from None
                continue
            bad_in_a_row = 0
            yield pair

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, skip = self._position[0], self._position[1]
        stream_seed = hash((self.seed, epoch, self.rank, worker)) & (2**63 - 1)
        rng = random.Random(stream_seed)
        data: Iterable = self._shards(rng)
        data = wds.tarfile_to_samples(handler=log_and_continue)(data)
        data = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(data)
        data = self._pairs(data)
        data = wds.batched(self.batch_size, partial=False)(data)
        # The loader takes batches from the workers in turn: batch j is worker j % workers's.
        skipped = max(0, math.ceil((skip - worker) / self.workers))
        return islice(data, skipped, self.batches_per_worker)


def write_shards(
    pairs: Iterable[tuple[bytes, str, object]],
    pattern: str,
    samples_per_shard: int = 1000,
    label: str = "txt",
) -> list[str]:
    """Write ``(image bytes, extension, caption)`` pairs as shards with webdataset's
    ShardWriter, the caption (or another label, such as a class index) under the member
    extension ``label``; ``pattern`` is a printf pattern such as ``out/%06d.tar``. Returns
    the shards written, none (and no empty file left) when there is no pair."""
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0) as sink:
        for written, (image, ext, caption) in enumerate(pairs, start=1):
            sink.write({"__key__": f"{written - 1:09d}", ext: image, label: caption})
        shards = [pattern % n for n in range(sink.shard)]  # numbered from 0; gone once closed
    if not written:  # the writer opens its first shard before any pair comes
        Path(shards[0]).unlink(missing_ok=True)
        return []
    return shards


def encode_image(image, ext: str = "png") -> bytes:
    """PIL image -> file bytes (``png``, ``jpg`` or ``webp``)."""
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(ext, ext.upper()))
    return buffer.getvalue()
