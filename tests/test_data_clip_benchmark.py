"""``limoe-data export --format clip_benchmark``: data sets in LAION CLIP_benchmark's layout,
read back by CLIP_benchmark's own loader (``build_wds_dataset``: webdataset over
``SPLIT/{0..n-1}.tar``, the first image extension found, ``txt`` split into lines or ``cls``)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from limoe.data import scenes
from limoe.data.export import main
from limoe.data.scenes import ScenesDataset

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def png(path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def read_like_clip_benchmark(
    root, label: str, split: str = "test"
) -> list[tuple[np.ndarray, object]]:
    """The samples as CLIP_benchmark's own loader (``build_wds_dataset``) reads them, without a
    transform."""
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    dataset = builder.build_wds_dataset(root.name, transform=None, split=split, data_dir=str(root))
    rows = [(np.asarray(image), target) for image, target in dataset]
    if label == "txt":
        assert dataset.classes is None  # read as a retrieval set
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
    assert [captions for _, captions in read] == [[c] for _, c in rows]  # one caption each
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


def test_scenes_as_a_retrieval_set_and_a_zero_shot_task_with_a_train_split(tmp_path, capsys):
    """The samples the scenes datamodule evaluates (full captions, its image size), as pairs,
    and one caption slot as classes with the slot's prompts; ``--split train`` writes a
    linear probe's train split beside the test split."""
    out = tmp_path / "first_shape"
    main(["export", "scenes", "--split", "test", "--size", "6", "--format", "clip_benchmark",
          "--out", str(tmp_path / "pairs")])  # fmt: skip
    for split in ("train", "test"):
        main(["export", "scenes", "--split", split, "--size", "5", "--task", "first_shape",
              "--format", "clip_benchmark", "--out", str(out)])  # fmt: skip
    assert "wrote 5 images of" in capsys.readouterr().out
    test = ScenesDataset("test", 6, return_labels=True)
    read = read_like_clip_benchmark(tmp_path / "pairs", "txt")
    assert [captions for _, captions in read] == [[test.caption(i)] for i in range(6)]
    assert all((pixels == test.image_uint8(i)).all() for i, (pixels, _) in enumerate(read))
    assert read[0][0].shape == (56, 56, 3)  # the scenes data's own image size
    task = scenes.zeroshot_tasks()["first_shape"]
    assert (out / "classnames.txt").read_text().splitlines() == task.classnames
    prompts = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert prompts == [t.replace("{}", "{c}") for t in task.templates]
    column = ScenesDataset.task_names.index("first_shape")
    for split in ("train", "test"):
        samples = ScenesDataset(split, 5, return_labels=True)
        read = read_like_clip_benchmark(out, "cls", split)
        assert [label for _, label in read] == [int(samples.labels(i)[column]) for i in range(5)]
        assert all((pixels == samples.image_uint8(i)).all() for i, (pixels, _) in enumerate(read))


def test_an_unknown_task_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "scenes", "--task", "colour", "--format", "clip_benchmark", "--out",
              str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert "--task colour: scenes has the zero-shot tasks first_colour, first_shape" in err
