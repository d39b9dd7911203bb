"""``limoe-data fashion-mnist`` on IDX files the test writes, laid out as Debian's package
lays them out (``usr/share/datasets/fashion-mnist/``): never the real package."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from limoe.data.export import main
from limoe.data.fashion_mnist import CLASSES, FILES
from limoe.data.imagefolder import classname, imagefolder_task


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_package(root, train_labels=(9, 0, 0, 3), test_labels=(1, 9)) -> dict:
    """IDX files: each image's pixels are its index times 10 plus a gradient, so each is told
    apart after the round trip."""
    folder = root / "usr/share/datasets/fashion-mnist"
    made = {}
    for split, labels in (("train", train_labels), ("test", test_labels)):
        images = np.stack([(np.arange(28 * 28).reshape(28, 28) + 10 * i) % 256
                           for i in range(len(labels))])  # fmt: skip
        write_idx(folder / FILES[split][0], images, 2051)
        write_idx(folder / FILES[split][1], np.array(labels), 2049)
        made[split] = (images, labels)
    return made


def test_class_folders_hold_each_image_under_its_label(tmp_path, capsys):
    made = fake_package(tmp_path / "pkg")
    main(["fashion-mnist", "--src", str(tmp_path / "pkg"), "--out", str(tmp_path / "out")])
    assert "wrote 4 train and 2 test images in 10 class folders" in capsys.readouterr().out
    for split, (images, labels) in made.items():
        for i, label in enumerate(labels):
            path = tmp_path / "out" / split / CLASSES[label] / f"{i:05d}.png"
            with Image.open(path) as image:
                assert image.mode == "L" and (np.asarray(image) == images[i]).all()
    # read as limoe reads a zero-shot tree: ten classes (empty folders too), sorted names
    task, items, labels = imagefolder_task("fmnist", tmp_path / "out" / "train")
    assert task.classnames == sorted(classname(c) for c in CLASSES)
    assert "t shirt or top" in task.classnames and "ankle boot" in task.classnames
    # in folder order: image 0 (ankle boot), 3 (dress), 1 and 2 (t-shirt/top)
    assert [task.classnames[y] for y in labels] == ["ankle boot", "dress", "t shirt or top",
                                                    "t shirt or top"]  # fmt: skip
    assert [path.split("/")[-1] for path, _ in items] == ["00000.png", "00003.png", "00001.png",
                                                          "00002.png"]  # fmt: skip
    templates = (tmp_path / "out" / "templates.txt").read_text().splitlines()
    assert templates[0] == "a photo of a {}." and all("{}" in t for t in templates)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda pkg: (pkg / "usr/share/datasets/fashion-mnist" / FILES["test"][1]).unlink(),
         "holds no t10k-labels-idx1-ubyte.gz"),
        (lambda pkg: write_idx(pkg / "usr/share/datasets/fashion-mnist" / FILES["train"][0],
                               np.zeros(3), 2049),
         "train-images-idx3-ubyte.gz is not an IDX file of images (magic 2049, expected 2051)"),
        (lambda pkg: write_idx(pkg / "usr/share/datasets/fashion-mnist" / FILES["train"][1],
                               np.array([1, 2]), 2049),
         "2 labels in 0..9 expected for 4 images"),
    ],
    ids=["missing", "not-images", "count"],
)  # fmt: skip
def test_bad_packages_end_in_one_line(spoil, message, tmp_path, capsys):
    fake_package(tmp_path / "pkg")
    spoil(tmp_path / "pkg")
    with pytest.raises(SystemExit) as stop:
        main(["fashion-mnist", "--src", str(tmp_path / "pkg"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
