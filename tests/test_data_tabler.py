"""``limoe-data tabler`` on a small fake pair of Tabler packages that the tests write, and a
training run on what it writes (``data=tabler``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from limoe.data.export import main as limoe_data
from limoe.data.tabler import Icon, held_out_concepts
from limoe.train import compose, train
from tests.conftest import SHAPES_ONLY_KEYS

# name: (category, tags, has a filled drawing)
ICONS = {
    "arrow-up": ("Arrows", ["direction", "north", "up", 2], True),
    "arrow-down": ("Arrows", ["direction", "south"], True),
    "star": ("Shapes", ["favourite", "rate", "star"], True),
    "circle": ("Shapes", ["round", "dot"], True),
    "heart": ("Shapes", ["love", "like"], True),
    "sun": ("Weather", ["day", "light", "bright", "summer", "hot", "warm"], True),
    "cloud": ("Weather", ["rain"], False),
    "moon": ("Weather", [], False),
}


def _icon(rng: np.random.Generator, size: int = 24) -> Image.Image:
    """A random opaque drawing on a transparent canvas, as Tabler's PNGs are."""
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., 3] = (rng.random((size, size)) > 0.7) * 255
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture
def packages(tmp_path: Path) -> tuple[Path, Path]:
    """The two unpacked npm packages (``package/`` folders), with one orphan PNG."""
    icons, png = tmp_path / "icons/package", tmp_path / "png/package/icons"
    icons.mkdir(parents=True)
    entries = {
        name: {"name": name, "category": c, "tags": tags, "styles": {}}
        for name, (c, tags, _) in ICONS.items()
    }
    (icons / "icons.json").write_text(json.dumps(entries))
    rng = np.random.default_rng(0)
    for name, (_, _, filled) in [*ICONS.items(), ("orphan", (None, None, False))]:
        for style in ("outline", "filled") if filled else ("outline",):
            (png / style).mkdir(parents=True, exist_ok=True)
            _icon(rng).save(png / style / f"{name}.png")
    return tmp_path / "icons", tmp_path / "png"


def _rows(path: Path) -> list[tuple[str, str]]:
    with path.open() as f:
        return [(r["filepath"], r["title"]) for r in csv.DictReader(f, delimiter="\t")]


def test_captions_join_the_name_and_tags_it_does_not_say():
    assert Icon("arrow-up", "Arrows", ("direction", "north", "up", "2")).caption(2) == (
        "arrow up: direction, north"
    )
    assert Icon("moon", "Weather", ()).caption() == "moon"
    assert Icon("a-b", "Text", ("a", "test", "test")).caption() == "a b: test"


def test_held_out_concepts_are_a_seeded_share_of_the_names():
    names = [f"n{i}" for i in range(50)]
    assert len(held_out_concepts(names, 0.2, seed=1)) == 10
    assert held_out_concepts(names, 0.2, 1) == held_out_concepts(reversed(names), 0.2, 1)
    assert held_out_concepts(names, 0.2, 1) != held_out_concepts(names, 0.2, 2)
    with pytest.raises(ValueError, match="--holdout must be in"):
        held_out_concepts(names, 1.0)


def test_tabler_writes_train_test_novel_and_category_folders(packages, tmp_path, capsys):
    icons, png = packages
    out = tmp_path / "out"
    limoe_data(["tabler", "--icons", str(icons), "--png", str(png), "--out", str(out),
                "--image-size", "16", "--holdout", "0.4"])  # fmt: skip
    message = capsys.readouterr().out
    assert "wrote 6 train, 4 test and 2 novel pairs (2 concepts held out; 1 icons" in message
    train_rows, test_rows, novel_rows = (
        _rows(out / f"{s}.csv") for s in ("train", "test", "novel")
    )
    novel = {Path(p).stem for p, _ in novel_rows}
    trained = {Path(p).stem for p, _ in train_rows}
    filled = {n for n, v in ICONS.items() if v[2]}
    # Held-out concepts are drawn from those with both styles, and neither style trains.
    assert len(novel) == 2 and novel <= filled and not novel & trained
    assert trained == set(ICONS) - novel  # the orphan PNG has no caption: left out
    assert {Path(p).stem for p, _ in test_rows} == filled - novel
    assert all(p.startswith("images/filled/") for p, _ in test_rows + novel_rows)
    captions = {Path(p).stem: c for p, c in train_rows + test_rows + novel_rows}
    assert captions["sun"] == "sun: day, light, bright, summer" and captions["moon"] == "moon"
    for task, names in (("category", filled - novel), ("category_novel", novel)):
        found = {p.stem: p.parent.name for p in (out / "zeroshot" / task).glob("*/*.png")}
        assert found == {n: ICONS[n][0] for n in names}
    # Composited on white (transparent pixels are black in the source), then resized.
    source = Image.open(png / "package/icons/outline/moon.png")
    white = Image.new("RGBA", source.size, (255, 255, 255, 255))
    expected = Image.alpha_composite(white, source).convert("RGB").resize((16, 16), Image.LANCZOS)
    written = Image.open(out / "images/outline/moon.png")
    assert written.mode == "RGB" and np.array_equal(np.asarray(written), np.asarray(expected))


def test_tabler_errors_name_the_folder(tmp_path, packages, capsys):
    icons, png = packages
    for argv, expected in (
        (["--icons", str(tmp_path), "--png", str(png)], "no icons.json there"),
        (["--icons", str(icons), "--png", str(icons)], "the unpacked @tabler/icons-png package"),
    ):
        with pytest.raises(SystemExit):
            limoe_data(["tabler", *argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert err.startswith("limoe-data: error:") and expected in err
        assert len(err.splitlines()) == 1


def test_train_on_tabler_reports_cross_style_novel_and_category_metrics(packages, tmp_path):
    icons, png = packages
    data_dir = tmp_path / "data"
    limoe_data(["tabler", "--icons", str(icons), "--png", str(png), "--out",
                str(data_dir / "tabler"), "--image-size", "16", "--holdout", "0.4"])  # fmt: skip
    overrides = ["experiment=smoke", *(f"~data.{key}" for key in SHAPES_ONLY_KEYS), "data=tabler",
                 f"paths.data_dir={data_dir}", "data.batch_size=2", "trainer.max_steps=2"]  # fmt: skip
    metrics = train(compose(overrides, tmp_path / "run"))
    for key in ("test/image_to_text_R@1", "test_novel/image_to_text_R@1",
                "test/category_zeroshot_top1", "test/category_novel_zeroshot_top1"):  # fmt: skip
        assert 0 <= metrics[key] <= 1, key
    # Four test pairs: R@5 covers them all.
    assert metrics["test/image_to_text_R@5"] == 1.0
