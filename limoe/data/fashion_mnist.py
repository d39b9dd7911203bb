"""Fashion-MNIST (Zalando Research, MIT licence): 70,000 greyscale 28 x 28 pictures of clothes
in 10 classes, the classic sanity check of zero-shot classification and linear probes. Debian
packages it as ``dataset-fashion-mnist``; limoe never downloads it:

    apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb fmnist
    limoe-data fashion-mnist --src fmnist --out data/fashion_mnist

``prepare_fashion_mnist`` reads the four IDX files (``train-images-idx3-ubyte.gz``, ...)
anywhere under ``--src`` and writes ImageFolder trees, ``OUT/train/<class>/<index>.png``
(60,000) and ``OUT/test/<class>/<index>.png`` (10,000), plus ``OUT/templates.txt``, prompts
for zero-shot classification. The trees are what ``limoe-eval probe.train=... probe.test=...``,
``data.zeroshot.NAME.root`` and ``limoe-data export --format clip_benchmark`` read.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

# The data set's labels 0-9, as folder names (``classname`` reads ``t-shirt_or_top`` as
# "t shirt or top"; a folder name cannot hold the original "T-shirt/top").
CLASSES: tuple[str, ...] = ("t-shirt_or_top", "trouser", "pullover", "dress", "coat", "sandal",
                            "shirt", "sneaker", "bag", "ankle_boot")  # fmt: skip
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a {}, an item of clothing.",
    "a product photo of a {}.",
)
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: unsigned bytes, 3 and 1 dimensions


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file's array (``magic``: what it must hold, images or labels)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise ValueError(f"{path} is not an IDX file of {kind} (magic {found}, expected {magic})")
    dims = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {array.size} bytes for the shape {shape}")
    return array.reshape(shape)


def find_files(src: str | Path) -> dict[str, Path]:
    """The four IDX files under ``src`` (the unpacked package or any folder holding them)."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"--src {src} is not a folder")
    found = {}
    for name in (n for pair in FILES.values() for n in pair):
        paths = sorted(src.rglob(name))
        if not paths:
            raise ValueError(f"--src {src} holds no {name} (unpack dataset-fashion-mnist with "
                             "dpkg-deb -x)")  # fmt: skip
        found[name] = paths[0]
    return found


def prepare_fashion_mnist(src: str | Path, out: str | Path) -> dict[str, int]:
    """Write the train and test ImageFolder trees and the templates; images per split."""
    files, out, counts = find_files(src), Path(out), {}
    for split, (images_name, labels_name) in FILES.items():
        images = read_idx(files[images_name], IMAGES_MAGIC)
        labels = read_idx(files[labels_name], LABELS_MAGIC)
        if len(images) != len(labels) or (len(labels) and labels.max() >= len(CLASSES)):
            raise ValueError(f"{files[labels_name]}: {len(labels)} labels in 0..{len(CLASSES) - 1} "
                             f"expected for {len(images)} images")  # fmt: skip
        for name in CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(len(images)), desc=f"fashion-mnist {split}", unit="image"):
            path = out / split / CLASSES[labels[i]] / f"{i:05d}.png"
            Image.fromarray(images[i], mode="L").save(path)
        counts[split] = len(images)
    (out / "templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES), encoding="utf-8")
    return counts
