"""Tabler Icons as open_clip data: a real, MIT-licensed set of human-drawn icons, each named,
tagged and filed in one of 41 categories, in two drawing styles (outline and filled).

The user fetches the two npm packages (nothing here downloads)::

    npm pack @tabler/icons-png@3.48.0 @tabler/icons@3.48.0
    mkdir -p tabler/icons tabler/png
    tar xzf tabler-icons-3.48.0.tgz -C tabler/icons
    tar xzf tabler-icons-png-3.48.0.tgz -C tabler/png
    limoe-data tabler --icons tabler/icons --png tabler/png --out data/tabler

``prepare_tabler`` writes, under ``out``: ``train.csv`` (outline icons), ``test.csv`` (filled
icons of the trained concepts: the same concepts in a style never trained on, so retrieval is
across styles), ``novel.csv`` (filled icons of concepts held out of training in both styles:
true zero-shot), and ``zeroshot/category/<category>/`` and ``zeroshot/category_novel/`` (the
filled icons as ImageFolder trees, for category zero-shot classification). Images are
composited on white and resized once here, so the training loader decodes small files.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from limoe.data.csv import write_csv
from limoe.data.images import write_image

STYLES = ("outline", "filled")
# Pairs written per output file: (csv name, style, held-out concepts?).
SPLITS = (("train", "outline", False), ("test", "filled", False), ("novel", "filled", True))


@dataclass(frozen=True)
class Icon:
    """One concept: its name (``arrow-big-down``), category and tags, as ``icons.json`` has."""

    name: str
    category: str
    tags: tuple[str, ...]

    def caption(self, max_tags: int = 4) -> str:
        """``arrow big down: direction, south, bottom``: the name's words, then up to
        ``max_tags`` tags that the name does not already say."""
        words = self.name.replace("-", " ").split()
        tags: list[str] = []
        for tag in self.tags:
            if tag and tag not in words and tag not in tags and len(tags) < max_tags:
                tags.append(tag)
        name = " ".join(words)
        return f"{name}: {', '.join(tags)}" if tags else name


def _find(root: Path, relative: str, what: str, flag: str) -> Path:
    """``root/relative`` or ``root/package/relative`` (the tarball's top folder)."""
    for base in (root, root / "package"):
        if (base / relative).exists():
            return base / relative
    raise ValueError(f"{flag} {root}: no {relative} there or in {root / 'package'}; give {what}")


def read_icons(icons_dir: str | Path) -> dict[str, Icon]:
    """The concepts of the unpacked ``@tabler/icons`` package (its ``icons.json``), by name."""
    path = _find(Path(icons_dir), "icons.json", "the unpacked @tabler/icons package", "--icons")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--icons: {path} is not JSON ({error})") from None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"--icons: {path} holds no icons (expected an object of icons by name)")
    icons = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not entry.get("category"):
            continue  # an uncategorised entry has no zero-shot class
        tags = tuple(str(t).strip().lower() for t in entry.get("tags") or ())
        icons[name] = Icon(name, str(entry["category"]), tags)
    if not icons:
        raise ValueError(f"--icons: {path} holds no icon with a category")
    return icons


def png_paths(png_dir: str | Path, style: str) -> dict[str, Path]:
    """The PNGs of one style in the unpacked ``@tabler/icons-png`` package, by icon name."""
    folder = _find(
        Path(png_dir), f"icons/{style}", "the unpacked @tabler/icons-png package", "--png"
    )
    return {p.stem: p for p in sorted(folder.glob("*.png"))}


def held_out_concepts(names: Iterable[str], share: float, seed: int = 0) -> set[str]:
    """A seeded ``share`` of ``names``, to keep out of training in every style."""
    if not 0 <= share < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {share}")
    names = sorted(names)
    return set(random.Random(seed).sample(names, round(share * len(names))))


def prepare_tabler(
    icons_dir: str | Path,
    png_dir: str | Path,
    out: str | Path,
    image_size: int = 64,
    holdout: float = 0.2,
    max_tags: int = 4,
    seed: int = 0,
) -> dict[str, int]:
    """Write the splits described in the module docstring; returns the pairs per split.

    ``holdout`` is the share of the concepts drawn in both styles that neither style trains
    on; ``image_size`` 0 keeps the 240 px originals. Icons without a PNG, and PNGs without an
    entry in ``icons.json``, are left out (counted as ``skipped``)."""
    if image_size < 0:
        raise ValueError(f"--image-size must be >= 0, got {image_size}")
    icons = read_icons(icons_dir)
    pngs = {style: png_paths(png_dir, style) for style in STYLES}
    if not pngs["outline"]:
        raise ValueError(f"--png {png_dir}: icons/outline holds no PNG")
    both = set(pngs["filled"]) & set(pngs["outline"]) & set(icons)
    novel = held_out_concepts(both, holdout, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"skipped": len(set(pngs["outline"]) ^ set(icons)), "concepts_held_out": len(novel)}
    jobs = []  # (source, image path relative to out, extra copies)
    for split, style, held in SPLITS:
        names = sorted(n for n in pngs[style] if n in icons and (n in novel) == held)
        rows = []
        for name in names:
            rel = f"images/{style}/{name}.png"
            rows.append((rel, icons[name].caption(max_tags)))
            task = "category_novel" if held else "category"
            folder = icons[name].category.replace(" ", "_")
            copies = [f"zeroshot/{task}/{folder}/{name}.png"] if style == "filled" else []
            jobs.append((pngs[style][name], rel, copies))
        write_csv(out / f"{split}.csv", rows)
        counts[split] = len(rows)
    for source, rel, copies in tqdm(jobs, desc="tabler icons", unit="icon"):
        write_image(source, out / rel, image_size)
        for copy in copies:
            (out / copy).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, out / copy)
    return counts
