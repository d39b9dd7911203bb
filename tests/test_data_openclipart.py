"""``limoe-data openclipart`` on a small fake pair of Debian packages that the tests write (SVGs
with OpenClipart's RDF metadata, PNGs beside them), and a training run on what it writes
(``data=openclipart``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from limoe.data.export import main as limoe_data
from limoe.data.openclipart import Drawing, Metadata, name_of, split_drawings
from limoe.train import compose, train
from tests.conftest import SHAPES_ONLY_KEYS

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  <rect width="{n}" height="10"/>
</svg>
"""
# path: (title, creator, keywords); the shallowest of two identical SVGs is kept.
DRAWINGS = {
    "animals/mammals/bored_dog_01": ("Bored dog", "Jose Hevia", ["mammal", "dog", "animals"]),
    "animals/cat_nicu_buculei_01": ("Clipart by Nicu Buculei - x", "Nicu Buculei", ["animal"]),
    "animals/birds/cigno_architetto_frances_01": ("Cigno", "Architetto Francesco", ["bird"]),
    "food/apple_01": ("Apple", "A. Author", ["fruit", "food", "hash", "A. Author"]),
    "food/pear_02": ("pear", "B", ["fruit", "2004"]),
    "food/plum": ("Plum", "C", []),
    "computer/icons/lemon-theme/home": ("Lemon SVG theme", "Jose Hevia", ["icons", "theme"]),
    "computer/icons/trash": ("Trash", "D", ["bin"]),
    "people/trash": ("Trash", "D", ["bin"]),  # the same file in a second folder
    "unsorted/kite": ("Kite", "E", ["toy"]),
    "shapes/stars/star_5pt": ("gramastar", "codifiedivining", ["stars"]),
    "special/gradients/rainbow": ("rainbow", "F", ["gradient"]),
    "shapes/0001": ("", "", []),  # nothing to say
}


def _svg(path: str, title: str, creator: str, keywords: list[str]) -> str:
    # Identical files for the duplicate pair; every other SVG differs in its rect.
    n = 1 if path.endswith("/trash") else len(path)
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return SVG.format(title=title, creator=creator, keywords=items, n=n)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """The two packages unpacked into one folder (``usr/share/openclipart/{svg,png}``), with a
    PNG-less SVG and an SVG that is not XML."""
    base = tmp_path / "src/usr/share/openclipart"
    rng = np.random.default_rng(0)
    for path, (title, creator, keywords) in DRAWINGS.items():
        svg, png = base / "svg" / f"{path}.svg", base / "png" / f"{path}.png"
        svg.parent.mkdir(parents=True, exist_ok=True)
        png.parent.mkdir(parents=True, exist_ok=True)
        svg.write_text(_svg(path, title, creator, keywords))
        rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)  # wide, partly transparent
        Image.fromarray(rgba, "RGBA").save(png)
    (base / "svg/food/lonely.svg").write_text(_svg("food/lonely", "Lonely", "G", []))
    (base / "svg/food/broken.svg").write_text("<svg><metadata>")
    Image.new("RGB", (4, 4)).save(base / "png/food/broken.png")
    return tmp_path / "src"


def _rows(path: Path) -> list[tuple[str, str]]:
    with path.open() as f:
        return [(r["filepath"], r["title"]) for r in csv.DictReader(f, delimiter="\t")]


def test_names_replace_author_and_collection_titles_by_the_file_name():
    def name(path, title, creator="Nicu Buculei", shared=frozenset()):
        return name_of(Metadata(path, title, creator, ()), shared)

    assert name("animals/bored_dog_01", "Bored dog") == "bored dog"
    assert name("animals/cat_nicu_buculei_01", "Clipart by Nicu Buculei - x") == "cat"
    assert name("animals/cat_nicu_bucul_01", "Nicu Buculei") == "cat"  # truncated author too
    assert name("computer/home", "Part of the Flat Icon Collection (2004)") == "home"
    assert name("computer/viewmag+", "blueberry - iconset") == "viewmag"
    # A title that many drawings share is completed by the file name's other words.
    assert name("games/white_h_9", "card", shared=frozenset({"card"})) == "card white h"


def test_captions_add_keywords_the_name_and_folders_do_not_say():
    drawing = Drawing("food/fruit/apple", "red apple", ("Fruit", "apple", "food", "hash", "1x"))
    assert drawing.caption() == "red apple"  # fruit and food are folders, hash a packaging tag
    drawing = Drawing("food/apple", "apple", ("red_fruit", "sweet", "crisp", "tree", "pie"))
    assert drawing.caption(max_tags=3) == "apple: red fruit, sweet, crisp"
    assert Drawing("food/plum", "", ("round",)).caption() == "round"


def test_splits_hold_names_out_and_split_the_rest_by_item():
    drawings = [Drawing(f"a/{i}", f"name{i % 20}", ()) for i in range(100)]
    drawings += [Drawing(f"b/{i}", "", ("tag",)) for i in range(10)]
    splits = split_drawings(drawings, holdout=0.25, test_share=0.1, seed=3)
    novel_names = {d.name for d in splits["novel"]}
    assert len(novel_names) == 5 and "" not in novel_names  # 25% of the 20 names
    assert len(splits["novel"]) == 25 and len(splits["test"]) == 8  # 10% of the other 85
    assert not novel_names & {d.name for d in splits["train"] + splits["test"]}
    paths = [d.path for s in splits.values() for d in s]
    assert sorted(paths) == sorted(d.path for d in drawings)
    assert split_drawings(drawings, 0.25, 0.1, 3) == splits
    with pytest.raises(ValueError, match="--test-share must be in"):
        split_drawings(drawings, 0.25, 1.0, 3)


CAPTIONS = {
    "animals/mammals/bored_dog_01": "bored dog: mammal",
    "animals/cat_nicu_buculei_01": "cat: animal",
    "animals/birds/cigno_architetto_frances_01": "cigno: bird",
    "food/apple_01": "apple: fruit",
    "food/pear_02": "pear: fruit",
    "food/plum": "plum",
    "computer/icons/lemon-theme/home": "home",
    "people/trash": "trash: bin",
    "unsorted/kite": "kite: toy",
}


def test_openclipart_writes_filtered_splits_and_category_folders(src, tmp_path, capsys):
    out = tmp_path / "out"
    limoe_data(["openclipart", "--src", str(src), "--out", str(out), "--image-size", "16",
                "--holdout", "0.01", "--test-share", "0.3"])  # fmt: skip
    message = capsys.readouterr().out
    assert "wrote 6 train, 3 test and 0 novel pairs in 4 categories" in message
    assert ("left out: 1 duplicate, 1 empty caption, 2 machine made, 1 missing png, "
            "1 unreadable svg") in message  # fmt: skip
    train_rows, test_rows = _rows(out / "train.csv"), _rows(out / "test.csv")
    assert _rows(out / "novel.csv") == []
    found = {p.removeprefix("images/").removesuffix(".png"): c for p, c in train_rows + test_rows}
    assert found == CAPTIONS
    tested = {p.removeprefix("images/").removesuffix(".png") for p, _ in test_rows}
    folders = {p.name: p.parent.name for p in (out / "zeroshot/category").glob("*/*.png")}
    assert folders == {
        t.replace("/", "__") + ".png": t.split("/")[0]
        for t in tested
        if not t.startswith("unsorted")
    }
    # Composited on white, padded to a square (centred) and resized.
    source = Image.open(src / "usr/share/openclipart/png/food/plum.png")
    flat = Image.alpha_composite(Image.new("RGBA", source.size, (255,) * 4), source)
    square = Image.new("RGB", (30, 30), (255, 255, 255))
    square.paste(flat.convert("RGB"), (0, 5))
    expected = np.asarray(square.resize((16, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(Image.open(out / "images/food/plum.png")), expected)


def test_openclipart_errors_name_the_folder(tmp_path, capsys):
    (tmp_path / "svg").mkdir()
    with pytest.raises(SystemExit):
        limoe_data(["openclipart", "--src", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("limoe-data: error: --src") and "no svg/ and png/ folders" in err
    assert len(err.splitlines()) == 1


def test_train_on_openclipart_reports_novel_and_category_metrics(src, tmp_path):
    data_dir = tmp_path / "data"
    limoe_data(["openclipart", "--src", str(src), "--out", str(data_dir / "openclipart"),
                "--image-size", "16", "--holdout", "0.3", "--test-share", "0.5"])  # fmt: skip
    overrides = ["experiment=smoke", *(f"~data.{key}" for key in SHAPES_ONLY_KEYS),
                 "data=openclipart", f"paths.data_dir={data_dir}", "data.batch_size=2",
                 "trainer.max_steps=2"]  # fmt: skip
    metrics = train(compose(overrides, tmp_path / "run"))
    for key in ("test/image_to_text_R@1", "test_novel/image_to_text_R@1",
                "test/category_zeroshot_top1", "test/category_novel_zeroshot_top1"):  # fmt: skip
        assert 0 <= metrics[key] <= 1, key
