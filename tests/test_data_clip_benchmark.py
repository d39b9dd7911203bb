"""``limoe-data export --format clip_benchmark``: data sets in LAION CLIP_benchmark's layout,
read back as CLIP_benchmark's own loader reads them (``build_wds_dataset``: webdataset over
``test/{0..n-1}.tar``, the first image extension found, ``txt`` split into lines or ``cls``)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from limoe.data.export import main

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def png(path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def read_like_clip_benchmark(root, label: str) -> list[tuple[np.ndarray, object]]:
    """CLIP_benchmark 1.6.2's ``build_wds_dataset``, without its transform."""
    nshards = int((root / "test" / "nshards.txt").read_text())
    urls = str(root / "test" / f"{{0..{nshards - 1}}}.tar")
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    rows = []
    for sample in dataset:
        image = next(sample[e] for e in ("webp", "png", "jpg", "jpeg") if e in sample)
        rows.append((np.asarray(image), sample[label]))
    return rows


def test_a_csv_becomes_a_retrieval_set(tmp_path, capsys):
    rows = [(f"img/{i}.png", f"caption number {i}") for i in range(5)]
    for i, colour in enumerate(COLOURS):
        png(tmp_path / f"img/{i}.png", colour)
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerows([("filepath", "title"), *rows])
    out = tmp_path / "cb"
    main(["export", str(tmp_path / "pairs.csv"), "--format", "clip_benchmark", "--out", str(out),
          "--samples-per-shard", "2"])  # fmt: skip
    assert "wrote 5 image-caption pairs" in capsys.readouterr().out
    assert (out / "dataset_type.txt").read_text() == "retrieval\n"
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar"]
    read = read_like_clip_benchmark(out, "txt")
    assert [text.splitlines() for _, text in read] == [[c] for _, c in rows]
    for (pixels, _), colour in zip(read, COLOURS):
        assert (pixels == np.array(colour, dtype=np.uint8)).all()


def test_class_folders_become_a_zero_shot_set(tmp_path, capsys):
    tree = tmp_path / "animals"
    for i, colour in enumerate(COLOURS[:3]):
        png(tree / "golden_retriever" / f"{i}.png", colour)
    png(tree / "cat" / "0.png", COLOURS[3])
    (tree / "cat" / "notes.txt").write_text("not an image")  # ignored, as ImageFolder does
    (tmp_path / "prompts.txt").write_text("a photo of a {}.\n\nan icon of a {}.\n")
    out = tmp_path / "cb"
    main(["export", str(tree), "--format", "clip_benchmark", "--out", str(out),
          "--templates", str(tmp_path / "prompts.txt")])  # fmt: skip
    assert "wrote 4 images of 2 classes" in capsys.readouterr().out
    assert (out / "classnames.txt").read_text() == "cat\ngolden retriever\n"
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == ["a photo of a {c}.", "an icon of a {c}."]
    assert templates[0].format(c="cat") == "a photo of a cat."  # CLIP_benchmark's formatting
    assert not (out / "dataset_type.txt").exists()  # absent: classification
    read = read_like_clip_benchmark(out, "cls")
    assert [label for _, label in read] == [0, 1, 1, 1]  # torchvision's sorted class order
    assert (read[0][0] == np.array(COLOURS[3], dtype=np.uint8)).all()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "nope.csv does not exist"),
        (lambda root: (root / "nope.csv").mkdir(), "holds no class folders of .jpg, .jpeg"),
        (lambda root: (root / "nope.csv" / "empty_class").mkdir(parents=True),
         "holds no class folders"),
    ],
)  # fmt: skip
def test_bad_sources_end_in_one_line(make, message, tmp_path, capsys):
    make(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(["export", str(tmp_path / "nope.csv"), "--format", "clip_benchmark",
              "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_a_template_without_a_slot_is_named(tmp_path, capsys):
    png(tmp_path / "tree" / "a" / "0.png", COLOURS[0])
    (tmp_path / "prompts.txt").write_text("a photo of a {}.\nno slot here\n")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "tree"), "--format", "clip_benchmark", "--out",
              str(tmp_path / "out"), "--templates", str(tmp_path / "prompts.txt")])  # fmt: skip
    assert "'no slot here' must hold one '{}'" in capsys.readouterr().err
