"""Tux Paint's stamps (Debian's ``tuxpaint-stamps-default``, GPL-2): about 950 pictures, many of
them photographs cut out of their background, some drawings (SVG), each with a sentence that
describes it ("A US 25 cent piece ($.25) called a quarter.") and its translations, filed in 16
category folders (animals, food, vehicles, ...). Captions that are sentences, not tags: too few
to train on, a transfer test of models trained on OpenClipart. limoe never downloads it:

    apt-get download tuxpaint-stamps-default && dpkg-deb -x tuxpaint-stamps-default_*.deb tuxpaint
    limoe-data tuxpaint --src tuxpaint --out data/tuxpaint

``prepare_tuxpaint`` writes, under ``--out``:

- ``pairs.csv``: every stamp with an image and an English sentence (open_clip's CSV, tab
  separated ``filepath`` and ``title``), the images composited on white, padded square and
  resized once (``images/<category>/.../<name>.png``): a sentence retrieval set;
- ``zeroshot/category/<category>/...``: the same images as an ImageFolder tree by top-level
  folder, with ``templates.txt``: a zero-shot task.

A stamp is a ``NAME.txt`` description beside ``NAME.png`` or, failing that, ``NAME.svg``
(rendered by resvg, ``pip install 'limoe-torch[svg]'``; without it SVG-only stamps are left
out and counted). PNGs without a description (Tux Paint's ``_mirror`` variants) are not stamps.
"""

from __future__ import annotations

import io
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from limoe.data.csv import write_csv
from limoe.data.images import write_image

# A translation line: ``fr.utf8=...``, ``pt_BR.utf8=...``, ``sr@latin.utf8=...``.
TRANSLATION = re.compile(r"^[A-Za-z]{2,3}(_[A-Za-z]{2,3})?(@\w+)?\.utf8=")
CATEGORY_NAMES = {"naturalforces": "natural_forces"}  # read as "natural forces"
TEMPLATES: tuple[str, ...] = (
    "a picture of {}.",
    "a photo of {}.",
    "a drawing of {}.",
    "clip art of {}.",
    "a picture from the category {}.",
)
SVG_WIDTH = 256  # pixels an SVG is rendered at before the square resize
UNIT_PIXELS = {"pt": 4 / 3, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0}  # CSS


@dataclass(frozen=True)
class Stamp:
    path: str  # under the stamps folder, without the suffix: ``animals/birds/duck``
    image: Path
    caption: str

    @property
    def category(self) -> str:
        top = self.path.split("/", 1)[0]
        return CATEGORY_NAMES.get(top, top)


def english(description: str) -> str | None:
    """The English sentence of a Tux Paint description: its one line that is not a
    translation."""
    lines = [line.strip() for line in description.splitlines() if line.strip()]
    found = [line for line in lines if not TRANSLATION.match(line)]
    return found[0] if found else None


def find_stamps(src: str | Path) -> Path:
    """The stamps folder of the unpacked package (or ``src`` itself)."""
    src = Path(src)
    for root in (src / "usr/share/tuxpaint/stamps", src / "stamps", src):
        if root.is_dir() and any(root.rglob("*.txt")):
            return root
    raise ValueError(f"--src {src} holds no Tux Paint stamps (NAME.txt beside NAME.png or .svg; "
                     "unpack tuxpaint-stamps-default with dpkg-deb -x)")  # fmt: skip


def _svg_renderer():
    try:
        import resvg_py
    except ImportError:
        return None
    return resvg_py


def read_stamps(root: Path, render_svg: bool = True) -> tuple[list[Stamp], Counter]:
    """Every stamp with an image and an English sentence, and the counts of those left out."""
    skipped: Counter = Counter()
    stamps = []
    for txt in sorted(root.rglob("*.txt")):
        stem = txt.with_suffix("")
        png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
        image = png if png.is_file() else svg if svg.is_file() else None
        caption = english(txt.read_text(encoding="utf-8", errors="replace"))
        if image is None:
            skipped["skipped_no_image"] += 1
        elif caption is None:
            skipped["skipped_no_english"] += 1
        elif image.suffix == ".svg" and not render_svg:
            skipped["skipped_svg_without_resvg"] += 1
        else:
            stamps.append(Stamp(stem.relative_to(root).as_posix(), image, caption))
    if not stamps:
        raise ValueError(f"--src: no stamp with an image and an English sentence under {root}")
    return stamps, skipped


def svg_markup(path: Path) -> str:
    """The SVG with its root size in pixels: resvg refuses a root ``width="128pt"`` without a
    ``viewBox`` ("SVG has an invalid size"), as 16 of the stamps have."""
    text = path.read_text(encoding="utf-8", errors="replace")
    root = re.search(r"<svg\b[^>]*>", text)
    if root is None:
        return text

    def in_pixels(match: re.Match) -> str:
        value = float(match.group(2)) * UNIT_PIXELS[match.group(3)]
        return f'{match.group(1)}"{value:g}"'

    tag = re.sub(
        r'(\b(?:width|height)=)"(\d+(?:\.\d+)?)(pt|pc|mm|cm|in)"', in_pixels, root.group(0)
    )
    return text[: root.start()] + tag + text[root.end() :]


def _source(stamp: Stamp, renderer) -> Path | io.BytesIO:
    if stamp.image.suffix != ".svg":
        return stamp.image
    png = renderer.svg_to_bytes(
        svg_string=svg_markup(stamp.image), width=SVG_WIDTH, resources_dir=str(stamp.image.parent)
    )
    return io.BytesIO(bytes(png))


def prepare_tuxpaint(src: str | Path, out: str | Path, image_size: int = 64) -> dict[str, int]:
    """Write ``pairs.csv``, the images, the category tree and its templates; returns the
    stamps written, the categories and the counts of stamps left out."""
    if image_size < 0:
        raise ValueError(f"--image-size must be >= 0, got {image_size}")
    renderer = _svg_renderer()
    stamps, counts = read_stamps(find_stamps(src), render_svg=renderer is not None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for stamp in tqdm(stamps, desc="tuxpaint stamps", unit="stamp"):
        rel = f"images/{stamp.path}.png"
        try:
            write_image(_source(stamp, renderer), out / rel, image_size)
        except Exception:  # PIL and resvg raise many types for files they cannot read
            counts["skipped_unreadable_image"] += 1
            continue
        rows.append((rel, stamp.caption))
        copy = out / "zeroshot/category" / stamp.category / f"{stamp.path.replace('/', '__')}.png"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / rel, copy)
    write_csv(out / "pairs.csv", rows)
    (out / "templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES), encoding="utf-8")
    counts["pairs"] = len(rows)
    counts["categories"] = len({s.category for s in stamps})
    return dict(counts)
