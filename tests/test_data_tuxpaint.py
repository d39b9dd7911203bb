"""``limoe-data tuxpaint`` on a stamps tree the test writes, laid out as Debian's
``tuxpaint-stamps-default`` lays it out (``usr/share/tuxpaint/stamps/<category>/...``): a PNG
stamp cut out of its background, an SVG-only stamp, a ``_mirror`` PNG without a description,
a description without an image. Never the real package."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from limoe.data import tuxpaint
from limoe.data.export import main
from limoe.data.imagefolder import imagefolder_task

DUCK = (
    "A yellow duck.\nfr.utf8=Un canard jaune.\npt_BR.utf8=Um pato amarelo.\nsr@latin.utf8=Patka.\n"
)
# Sized in points without a viewBox, as 16 of the real stamps are
SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="30pt" height="30pt">'
       '<rect width="40" height="40" fill="#0000ff"/></svg>')  # fmt: skip


def fake_package(root):
    stamps = root / "usr/share/tuxpaint/stamps"
    birds, space = stamps / "animals/birds", stamps / "naturalforces"
    birds.mkdir(parents=True)
    space.mkdir(parents=True)
    duck = np.zeros((20, 40, 4), np.uint8)  # a yellow bar on a transparent ground
    duck[5:15, :, :] = (250, 220, 0, 255)
    Image.fromarray(duck, "RGBA").save(birds / "duck.png")
    Image.fromarray(duck, "RGBA").save(birds / "duck_mirror.png")  # a variant, no .txt
    (birds / "duck.txt").write_text(DUCK, encoding="utf-8")
    (birds / "duck.dat").write_text("nomirror\n")
    (space / "rain.svg").write_text(SVG)
    (space / "rain.txt").write_text("Blue rain.\nde.utf8=Blauer Regen.\n")
    (space / "ghost.txt").write_text("A stamp with no picture.\n")
    return stamps


def test_stamps_become_sentence_pairs_and_category_folders(tmp_path, capsys):
    pytest.importorskip("resvg_py")
    fake_package(tmp_path / "pkg")
    main(["tuxpaint", "--src", str(tmp_path / "pkg"), "--out", str(tmp_path / "out"),
          "--image-size", "16"])  # fmt: skip
    out = capsys.readouterr().out
    assert "wrote 2 stamps in 2 categories" in out and "(left out: 1 no image)" in out
    with (tmp_path / "out/pairs.csv").open() as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows == [["filepath", "title"], ["images/animals/birds/duck.png", "A yellow duck."],
                    ["images/naturalforces/rain.png", "Blue rain."]]  # fmt: skip
    with Image.open(tmp_path / "out/images/animals/birds/duck.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (16, 16, 3)
    assert (pixels[0, 0] == 255).all()  # transparent ground and square padding: white
    assert tuple(pixels[8, 8]) == (250, 220, 0)
    with Image.open(tmp_path / "out/images/naturalforces/rain.png") as image:
        assert tuple(np.asarray(image.convert("RGB"))[8, 8]) == (0, 0, 255)  # the SVG, rendered
    task, items, labels = imagefolder_task("category", tmp_path / "out/zeroshot/category")
    assert task.classnames == ["animals", "natural forces"]
    assert labels == [0, 1] and items[0][0].endswith("animals__birds__duck.png")
    assert (tmp_path / "out/templates.txt").read_text().splitlines()[0] == "a picture of {}."


def test_without_resvg_svg_stamps_are_counted_out(tmp_path, capsys, monkeypatch):
    fake_package(tmp_path / "pkg")
    monkeypatch.setattr(tuxpaint, "_svg_renderer", lambda: None)
    main(["tuxpaint", "--src", str(tmp_path / "pkg"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "wrote 1 stamps in 1 categories" in out
    assert "left out: 1 no image, 1 svg without resvg" in out


def test_english_is_the_line_that_is_not_a_translation():
    assert tuxpaint.english(DUCK) == "A yellow duck."
    assert tuxpaint.english("fr.utf8=Un canard.\n\n  A duck.  \n") == "A duck."
    assert tuxpaint.english("fr.utf8=Un canard.\n") is None


def test_svg_sizes_in_points_become_pixels(tmp_path):
    (tmp_path / "a.svg").write_text(SVG)
    assert '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40">' in tuxpaint.svg_markup(
        tmp_path / "a.svg"
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root.mkdir(), "holds no Tux Paint stamps"),
        (lambda root: (root / "a").mkdir(parents=True) or (root / "a/x.txt").write_text("fr.utf8=y"),
         "no stamp with an image and an English sentence"),
    ],
)  # fmt: skip
def test_bad_sources_end_in_one_line(make, message, tmp_path, capsys):
    make(tmp_path / "pkg")
    with pytest.raises(SystemExit) as stop:
        main(["tuxpaint", "--src", str(tmp_path / "pkg"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
