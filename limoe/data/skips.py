"""The samples a split leaves out, counted per reason, and the check that stops a run whose
data is mostly (or wholly) unusable before it trains on it.

A sample is left out for one of ``REASONS``: its image file is missing (or a shard sample has
no image member), its caption is empty, its image cannot be decoded, or its CSV row cannot be
read (not UTF-8, too few fields). Most are found when a split's files are read; an image that
decodes its header but fails later (a truncated file) is found when it is loaded, in whichever
DataLoader worker loads it. So ``SkipCounts`` keeps two tallies: ``read``, the same on every
process, and ``loaded``, this process's own (shared with its workers), which DDP sums.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Mapping

log = logging.getLogger("limoe.data")

REASONS: tuple[str, ...] = ("missing_file", "empty_caption", "undecodable", "unreadable_row")
# What to change, per reason, when a split has too few usable samples.
ADVICE = {
    "missing_file": "check the image paths (a CSV's are read relative to its folder)",
    "empty_caption": "check the caption column (data.csv_caption_key) or the txt members",
    "undecodable": "the files are not images PIL can open",
    "unreadable_row": "save the CSV as UTF-8 with data.csv_separator between fields",
}


class UnusableDataError(ValueError):
    """A split with no usable sample, or more unusable ones than the run allows."""


class SkipCounts:
    """Rows seen and samples left out of one split, per reason; ``where`` names the split for
    messages (``data.train_data=train.csv``)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.rows = 0
        self.read = dict.fromkeys(REASONS, 0)
        self._loaded = mp.Array("q", len(REASONS) + 1, lock=True)  # rows, then REASONS

    def skip(self, reason: str, what: object, detail: str = "") -> None:
        """Leave out a sample found unusable while the files are read; logged with its path."""
        self.read[reason] += 1
        log.warning("skipping %s: %s %s%s", self.where, reason.replace("_", " "), what,
                    f" ({detail})" if detail else "")  # fmt: skip

    def loaded_row(self) -> None:
        """Count a sample streamed while training (shards have no rows to count up front)."""
        with self._loaded.get_lock():
            self._loaded[0] += 1

    def skip_loaded(self, reason: str) -> None:
        """Count a sample found unusable while loading (logged by the caller)."""
        with self._loaded.get_lock():
            self._loaded[1 + REASONS.index(reason)] += 1

    def loaded(self) -> list[int]:
        """This process's tallies found while loading: rows, then one per reason."""
        return list(self._loaded[:])

    def totals(self, loaded: list[int] | None = None) -> dict[str, int]:
        """Rows and skips per reason; ``loaded`` is the loading tally summed over processes
        (this process's where not given)."""
        loaded = self.loaded() if loaded is None else loaded
        totals = {"rows": self.rows + loaded[0]}
        for i, reason in enumerate(REASONS):
            totals[f"skipped_{reason}"] = self.read[reason] + loaded[1 + i]
        return totals

    def usable(self) -> int:
        return self.rows - sum(self.read.values())

    def summary(self, totals: Mapping[str, int] | None = None) -> str:
        """``2 missing file, 1 empty caption``: the reasons that left samples out."""
        totals = totals or self.totals()
        parts = [f"{totals[f'skipped_{r}']} {r.replace('_', ' ')}" for r in REASONS
                 if totals[f"skipped_{r}"]]  # fmt: skip
        return ", ".join(parts) or "none"

    def check(self, max_skipped_fraction: float) -> None:
        """Stop unless some samples are usable and at most ``max_skipped_fraction`` of the
        rows read were left out: a wrong image root should not train on the few rows that
        happen to exist."""
        skipped = self.rows - self.usable()
        if self.rows == 0:
            raise UnusableDataError(f"{self.where} holds no samples (0 rows read)")
        worst = max(REASONS, key=self.read.__getitem__)
        if self.usable() == 0:
            raise UnusableDataError(
                f"{self.where}: no usable sample among {self.rows} rows read "
                f"({self.summary()}); {ADVICE[worst]}"
            )
        if skipped > max_skipped_fraction * self.rows:
            raise UnusableDataError(
                f"{self.where}: {skipped} of {self.rows} rows are unusable ({self.summary()}), "
                f"more than data.max_skipped_fraction={max_skipped_fraction}; {ADVICE[worst]}"
            )
        if skipped:
            log.warning("%s: skipped %d of %d samples (%s)", self.where, skipped, self.rows,
                        self.summary())  # fmt: skip
