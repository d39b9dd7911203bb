"""The manual's relative links: every file a page links to exists, and every `page.md#anchor`
names a heading of that page (GitHub's slugs), so a renamed section cannot strand its links."""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: a link counts as its text; lower case, punctuation but
    `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    """Every heading's slug, repeats numbered as GitHub numbers them (`name`, `name-1`, ...);
    fenced code is skipped (its `#` lines are shell comments)."""
    names: set[str] = set()
    repeats: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        n = repeats.get(base, 0)
        repeats[base] = n + 1
        names.add(f"{base}-{n}" if n else base)
    return frozenset(names)


def test_slug_matches_githubs_for_the_headings_this_manual_uses():
    assert slug("`model=clip_moe`: experts in CLIP's image tower") == (
        "modelclip_moe-experts-in-clips-image-tower"
    )
    assert slug("On real data: Tabler Icons") == "on-real-data-tabler-icons"
    assert slug("Paper sizes: `model=limoe_b32|limoe_b16`") == "paper-sizes-modellimoe_b32limoe_b16"
    assert slug("Your files ([data.md](data.md#own))") == "your-files-datamd"


def test_repeated_headings_are_numbered(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Notes\n```bash\n# not a heading\n```\n## Notes\n### Notes\n")
    assert anchors(page) == {"notes", "notes-1", "notes-2"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {os.path.relpath(linked, ROOT)}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name} links nowhere: {broken}"
