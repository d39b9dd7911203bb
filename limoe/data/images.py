"""Image files and what decodes them: tar members read by offset, decoding to RGB (transparency
composited on a background), the square images ``limoe-data`` writes, and the check that
leaves out rows whose file is missing, whose caption is empty or whose header PIL cannot
identify (each counted and logged with its path, ``limoe.data.skips``)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image
from tqdm.auto import tqdm

from limoe.data.skips import SkipCounts

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class TarMember:
    """A file inside an uncompressed tar archive, read by offset (random access); ``name``
    (the member's name) is for messages."""

    path: str
    offset: int
    size: int
    name: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.name or self.offset}"

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


ImageSource = str | TarMember


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode as RGB; transparency (RGBA, LA, palette with a transparent colour) is
    composited on ``background`` rather than dropped, which would show the hidden colours."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")


def write_image(source: Path | BinaryIO, target: Path, image_size: int) -> None:
    """The image at ``source`` (a path or an open file) composited on white, padded to a centred square (drawings are
    not all square; a square image is unchanged) and resized to ``image_size`` (0 keeps its
    size), saved at ``target``: what ``limoe-data`` writes once so loaders decode small files."""
    with Image.open(source) as image:
        image = to_rgb(image)
    side = max(image.size)
    square = Image.new("RGB", (side, side), WHITE)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if image_size:
        square = square.resize((image_size, image_size), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    square.save(target)


def open_image(source: ImageSource | bytes, background: tuple[int, int, int] = WHITE):
    """Decode an image file, tar member or bytes to an RGB PIL image (fully loaded, so a
    truncated file fails here rather than inside a transform)."""
    if isinstance(source, TarMember):
        source = source.read()
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    return to_rgb(image, background)


def keep_readable(
    items: Sequence[tuple[ImageSource, str | None]],
    counts: SkipCounts,
    need_caption: bool = True,
    check_images: bool = True,
) -> list[tuple[ImageSource, str | None]]:
    """The items whose file exists, whose caption is not empty and (``check_images``) whose
    header PIL can identify; each other one is counted in ``counts`` and logged with its
    path. Opening every header costs a file open per row and finds files that are not images
    before training rather than one substitution at a time."""
    kept = []
    rows = tqdm(items, desc=f"read {counts.where}", unit="row", delay=2, leave=False)
    for source, caption in rows:
        counts.rows += 1
        if isinstance(source, str) and not Path(source).is_file():
            counts.skip("missing_file", source)
        elif need_caption and not (caption or "").strip():
            counts.skip("empty_caption", source)
        elif check_images and (problem := _unidentified(source)):
            counts.skip("undecodable", source, problem)
        else:
            kept.append((source, caption))
    return kept


def _unidentified(source: ImageSource) -> str | None:
    """Why PIL cannot identify the image's format from its header; None when it can."""
    try:
        file = io.BytesIO(source.read()) if isinstance(source, TarMember) else source
        with Image.open(file):
            return None
    except Exception as error:  # PIL raises many types for files that are not images
        return f"{type(error).__name__}: {error}"
