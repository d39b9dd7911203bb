"""open_clip's CSV format: one row per pair, an image-path column and a caption column."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from limoe.data.images import keep_readable
from limoe.data.skips import SkipCounts


@dataclass(frozen=True)
class CsvSource:
    """A split in open_clip's CSV format (``read_csv``): map-style rows, which training
    shuffles per epoch."""

    path: str
    img_key: str = "filepath"
    caption_key: str = "title"
    separator: str = "\t"
    streams: ClassVar[bool] = False  # training reads the rows, it streams nothing

    def items(self, counts: SkipCounts, check_images: bool = True) -> list[tuple[str, str]]:
        """The usable ``(image path, caption)`` rows, the others counted in ``counts``."""
        return read_csv(
            self.path, self.img_key, self.caption_key, self.separator, counts, check_images
        )


def read_csv(
    path: str | Path,
    img_key: str = "filepath",
    caption_key: str = "title",
    separator: str = "\t",
    counts: SkipCounts | None = None,
    check_images: bool = True,
) -> list[tuple[str, str]]:
    """``(image path, caption)`` rows of a CSV; relative paths are read from the CSV's folder.

    A row that cannot be read (bytes that are not UTF-8, too few fields, a quoting error) is
    logged with its file and line and counted like a missing image, as are rows with a
    missing image file, an empty caption or (``check_images``) a file that is not an image;
    ``counts`` gets the tally. A file without the named columns fails at once, naming the
    columns it has.
    """
    path = Path(path)
    counts = counts if counts is not None else SkipCounts(str(path))
    if not path.is_file():
        raise ValueError(f"CSV file {path} does not exist")
    # surrogateescape: a row with bytes that are not UTF-8 is found and skipped, not fatal.
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        missing = [key for key in (img_key, caption_key) if key not in columns]
        if missing:
            raise ValueError(
                f"{path} has no column {', '.join(map(repr, missing))} (csv_img_key="
                f"{img_key!r}, csv_caption_key={caption_key!r}); its columns are {columns} "
                f"with csv_separator={separator!r}"
            )
        rows = [(str(path.parent / r[img_key]), r[caption_key]) for r in _rows(reader, counts)]
    return keep_readable(rows, counts, check_images=check_images)


def _rows(reader: csv.DictReader, counts: SkipCounts) -> Iterator[dict[str, str]]:
    """The readable rows; each other one is counted and logged with its file and line."""
    while True:
        try:
            row = next(reader)
            problem = _problem(row)
        except StopIteration:
            return
        except csv.Error as error:
            problem = str(error)
        if problem:
            counts.rows += 1
            counts.skip("unreadable_row", f"at line {reader.line_num}", problem)
        else:
            yield row


def _problem(row: dict) -> str | None:
    values = [v for v in row.values() if isinstance(v, str)]
    if any(_not_utf8(v) for v in values):
        return "bytes that are not UTF-8"
    if None in row.values():
        return f"{len(values)} fields, fewer than the header's"
    return None


def _not_utf8(text: str) -> bool:
    """Decoded with surrogateescape, each byte that is not UTF-8 became a lone surrogate."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def write_csv(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    """``(image path, caption)`` rows as the CSV ``read_csv`` reads with the default keys
    (``filepath``, ``title``, tab-separated), as open_clip's ``--csv-*`` defaults expect."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
