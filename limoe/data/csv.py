"""open_clip's CSV format: one row per pair, an image-path column and a caption column."""

from __future__ import annotations

import csv
from pathlib import Path

from limoe.data.pairs import keep_readable


def read_csv(
    path: str | Path, img_key: str = "filepath", caption_key: str = "title", separator: str = "\t"
) -> list[tuple[str, str]]:
    """``(image path, caption)`` rows of a CSV; relative paths are read from the CSV's folder.

    Rows with a missing image file or an empty caption are logged and left out; a file without
    the named columns fails at once, naming the columns it has.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CSV file {path} does not exist")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        missing = [key for key in (img_key, caption_key) if key not in columns]
        if missing:
            raise ValueError(
                f"{path} has no column {', '.join(map(repr, missing))} (csv_img_key="
                f"{img_key!r}, csv_caption_key={caption_key!r}); its columns are {columns} "
                f"with csv_separator={separator!r}"
            )
        rows = [(str(path.parent / row[img_key]), row[caption_key]) for row in reader]
    return keep_readable(rows, str(path))
