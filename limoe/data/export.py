"""``limoe-data``: write data as files that the ``csv`` and ``webdataset`` data configs (and
open_clip itself) read: ``export`` the shapes data or any open_clip CSV, or prepare ``tabler``
(Tabler Icons, from its two unpacked npm packages; see ``limoe.data.tabler``) or
``openclipart`` (from Debian's two unpacked packages; see ``limoe.data.openclipart``) or
``fashion-mnist`` and ``tuxpaint`` (from Debian's unpacked packages; see
``limoe.data.fashion_mnist`` and ``limoe.data.tuxpaint``).

    limoe-data export shapes --split train --size 10000 --format webdataset --out data/shards
    limoe-data export shapes --split test --size 500 --format imagefolder --task shape --out data/zs
    limoe-data export data/train.csv --format webdataset --out data/shards
    limoe-data export data/test.csv --format clip_benchmark --out data/cb/test_retrieval
    limoe-data export data/zs/shape --format clip_benchmark --out data/cb/shape
    limoe-data export scenes --split test --format clip_benchmark --out data/cb/scenes
    limoe-data export scenes --task first_shape --format clip_benchmark --out data/cb/first_shape
    limoe-data tabler --icons tabler/icons --png tabler/png --out data/tabler
    limoe-data openclipart --src openclipart --out data/openclipart
    limoe-data fashion-mnist --src fmnist --out data/fashion_mnist
    limoe-data tuxpaint --src tuxpaint --out data/tuxpaint
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from limoe.data import scenes, shapes
from limoe.data.clip_benchmark import SPLIT, write_classification, write_retrieval
from limoe.data.csv import read_csv
from limoe.data.fashion_mnist import prepare_fashion_mnist
from limoe.data.imagefolder import check_templates, imagefolder_task
from limoe.data.images import IMAGE_EXTENSIONS
from limoe.data.openclipart import prepare_openclipart
from limoe.data.procedural import ProceduralPairs
from limoe.data.scenes import ScenesDataset
from limoe.data.shapes import ATTRIBUTE_VALUES, SPLITS, ShapesDataset, export_csv, rendered_samples
from limoe.data.tabler import prepare_tabler
from limoe.data.tuxpaint import prepare_tuxpaint
from limoe.data.webdataset import encode_image, write_shards

FORMATS = ("webdataset", "csv", "imagefolder", "clip_benchmark")
# The embedded data sets: their dataset class and zero-shot tasks (the evaluation splits'
# samples, as the datamodules build them: full captions, no hard negatives).
PROCEDURAL = {
    "shapes": (ShapesDataset, shapes.zeroshot_tasks),
    "scenes": (ScenesDataset, scenes.zeroshot_tasks),
}


def procedural_dataset(
    name: str, split: str, size: int, image_size: int | None = None, seed: int = 0
) -> ProceduralPairs:
    """The first ``size`` samples of a split of ``shapes`` or ``scenes`` (``image_size``
    None: the data set's own)."""
    dataset_class, _ = PROCEDURAL[name]
    sized = {"image_size": image_size} if image_size else {}
    return dataset_class(split, size, seed=seed, return_labels=True, **sized)


def procedural_samples(
    dataset: ProceduralPairs, task: str | None = None
) -> Iterator[tuple[bytes, str, object]]:
    """``(png bytes, "png", caption)``, or the class index of zero-shot ``task``, per
    sample."""
    column = dataset.task_names.index(task) if task else None
    for i in range(len(dataset)):
        image = encode_image(Image.fromarray(dataset.image_uint8(i)))
        yield image, "png", dataset.caption(i) if column is None else int(dataset.labels(i)[column])


def csv_pairs(rows: list[tuple[str, object]]) -> Iterator[tuple[bytes, str, object]]:
    """``(image path, caption or label)`` rows (``read_csv``'s, an ImageFolder's) as image file
    bytes, the extension and the caption or label (formats other than jpg/png/webp as png)."""
    for image_path, caption in rows:
        ext = Path(image_path).suffix.lower().lstrip(".").replace("jpeg", "jpg")
        if ext in IMAGE_EXTENSIONS:
            yield Path(image_path).read_bytes(), ext, caption
        else:
            with Image.open(image_path) as image:
                yield encode_image(image.convert("RGBA")), "png", caption


def export_imagefolder(
    split: str, size: int, out: str | Path, task: str, image_size: int = 32, seed: int = 0
) -> Path:
    """``out/<class>/<index>.png`` for one shapes attribute: a zero-shot ImageFolder tree."""
    if task not in ATTRIBUTE_VALUES:
        raise ValueError(f"--task must be one of {tuple(ATTRIBUTE_VALUES)}, got {task!r}")
    out = Path(out)
    samples = rendered_samples(split, size, image_size, seed)
    for i, attrs, image in tqdm(samples, total=size, desc=f"export {split}/{task}", unit="image"):
        folder = out / attrs.names[task].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return out


def source_pairs(args: argparse.Namespace) -> tuple[Iterator[tuple[bytes, str, str]], int]:
    """The image-caption pairs of the ``shapes`` or ``scenes`` split or the CSV the command
    names, and how many there are."""
    if args.source in PROCEDURAL:
        dataset = procedural_dataset(args.source, args.split, args.size, args.image_size, args.seed)
        return procedural_samples(dataset), args.size
    rows = read_csv(args.source, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    return csv_pairs(rows), len(rows)


def export_clip_benchmark(args: argparse.Namespace) -> str:
    """An ImageFolder tree or a zero-shot task of ``shapes``/``scenes`` (``--task``) as a
    classification set, or the embedded data or a CSV as a retrieval set, in CLIP_benchmark's
    layout (``limoe.data.clip_benchmark``), as the split ``--split`` names."""
    where = {"out": args.out, "samples_per_shard": args.samples_per_shard, "split": args.split}
    if args.source in PROCEDURAL and args.task:
        task = _procedural_task(args.source, args.task)
        dataset = procedural_dataset(args.source, args.split, args.size, args.image_size, args.seed)
        samples = tqdm(procedural_samples(dataset, args.task), total=len(dataset),
                       desc=f"export {args.task}", unit="image")  # fmt: skip
        templates = _templates(args) or task.templates
        write_classification(samples, task.classnames, templates, **where)
        return f"wrote {samples.n} images of {len(task.classnames)} classes to {args.out}"
    source = Path(args.source)
    if args.source not in PROCEDURAL and source.is_dir():
        templates = _templates(args)
        try:
            task, items, labels = imagefolder_task(source.name, source, templates)
        except (ValueError, FileNotFoundError):  # torchvision: no class folder at all
            raise ValueError(f"{source} holds no class folders of .jpg, .jpeg, .png or .webp "
                             "images (an ImageFolder tree)") from None  # fmt: skip
        rows = [(path, label) for (path, _), label in zip(items, labels)]
        samples = tqdm(csv_pairs(rows), total=len(rows), desc="export classes", unit="image")
        write_classification(samples, task.classnames, task.templates, **where)
        return f"wrote {samples.n} images of {len(task.classnames)} classes to {args.out}"
    pairs, total = source_pairs(args)
    pairs = tqdm(pairs, total=total, desc="export pairs", unit="pair")
    write_retrieval(pairs, **where)
    return f"wrote {pairs.n} image-caption pairs to {args.out}"


def _procedural_task(source: str, name: str):
    tasks = PROCEDURAL[source][1]()
    if name not in tasks:
        raise ValueError(f"--task {name}: {source} has the zero-shot tasks {', '.join(tasks)}")
    return tasks[name]


def _templates(args: argparse.Namespace) -> list[str] | None:
    """The prompts of ``--templates FILE`` (one per line, each with one ``{}``), or None."""
    if not args.templates:
        return None
    lines = Path(args.templates).read_text(encoding="utf-8").splitlines()
    return check_templates([t for t in lines if t.strip()], f"--templates {args.templates}")


def export(args: argparse.Namespace) -> str:
    if args.format == "clip_benchmark":
        return export_clip_benchmark(args)
    if args.format == "imagefolder":
        if args.source != "shapes":
            raise ValueError("--format imagefolder exports the shapes data only")
        root = export_imagefolder(
            args.split, args.size, args.out, args.task or "shape", args.image_size or 32, args.seed
        )
        return f"wrote {args.size} images in class folders under {root}"
    if args.format == "csv":
        if args.source == "scenes":
            raise ValueError("--format csv exports the shapes data or a CSV, not scenes")
        if args.source != "shapes":
            raise ValueError("a CSV source is a CSV already; export it with --format webdataset")
        path = export_csv(args.split, args.size, args.out, args.image_size or 32, args.seed)
        return f"wrote {args.size} samples to {path}"
    pairs, total = source_pairs(args)
    pattern = str(Path(args.out) / f"{args.prefix}%06d.tar")
    pairs = tqdm(pairs, total=total, desc="export shards", unit="pair")
    shards = write_shards(pairs, pattern, args.samples_per_shard)
    if not shards:
        raise ValueError(f"{args.source} holds no readable pairs: no shard written")
    last = Path(shards[-1]).stem[len(args.prefix) :]
    urls = Path(args.out) / f"{args.prefix}{{000000..{last}}}.tar"
    return f"wrote {pairs.n} pairs to {len(shards)} shards: {urls}"


def tabler(args: argparse.Namespace) -> str:
    counts = prepare_tabler(
        args.icons, args.png, args.out, args.image_size, args.holdout, args.max_tags, args.seed
    )
    return (
        f"wrote {counts['train']} train, {counts['test']} test and {counts['novel']} novel "
        f"pairs ({counts['concepts_held_out']} concepts held out; {counts['skipped']} icons "
        f"without both a PNG and an icons.json entry left out) under {args.out}"
    )


def openclipart(args: argparse.Namespace) -> str:
    counts = prepare_openclipart(
        args.src, args.out, args.image_size, args.holdout, args.test_share, args.max_tags,
        args.seed,
    )  # fmt: skip
    left_out = ", ".join(f"{n} {k.removeprefix('skipped_').replace('_', ' ')}"
                         for k, n in sorted(counts.items()) if k.startswith("skipped_"))  # fmt: skip
    return (
        f"wrote {counts['train']} train, {counts['test']} test and {counts['novel']} novel "
        f"pairs in {counts['categories']} categories under {args.out} (left out: "
        f"{left_out or 'none'})"
    )


def fashion_mnist(args: argparse.Namespace) -> str:
    counts = prepare_fashion_mnist(args.src, args.out)
    return (f"wrote {counts['train']} train and {counts['test']} test images in 10 class folders "
            f"under {args.out} (templates: {args.out}/templates.txt)")  # fmt: skip


def tuxpaint(args: argparse.Namespace) -> str:
    counts = prepare_tuxpaint(args.src, args.out, args.image_size)
    left_out = ", ".join(f"{n} {k.removeprefix('skipped_').replace('_', ' ')}"
                         for k, n in sorted(counts.items()) if k.startswith("skipped_"))  # fmt: skip
    return (f"wrote {counts['pairs']} stamps in {counts['categories']} categories to "
            f"{args.out}/pairs.csv and {args.out}/zeroshot/category (left out: "
            f"{left_out or 'none'})")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="limoe-data", description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    p = commands.add_parser("export", help="write shapes or a CSV as shards, CSV or folders")
    p.add_argument("source", help="'shapes', 'scenes', the path of an open_clip CSV, or "
                   "(clip_benchmark) an ImageFolder tree of class folders")  # fmt: skip
    p.add_argument("--format", choices=FORMATS, default="webdataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", choices=SPLITS, help="shapes/scenes split, and the clip_benchmark "
                   "split folder (default: train; clip_benchmark: test)")  # fmt: skip
    p.add_argument("--size", type=int, default=1000, help="number of shapes/scenes samples")
    p.add_argument("--image-size", type=int, help="pixels (default: shapes 32, scenes 56)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", help="imagefolder: the shapes attribute as class (default shape); "
                   "clip_benchmark: a zero-shot task of shapes/scenes as class")  # fmt: skip
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--prefix", default="", help="shard file name prefix")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-separator", default="\t")
    p.add_argument("--templates", help="clip_benchmark classes: a file of prompts, one per "
                   "line, each with one '{}' (default: limoe's zero-shot templates)")  # fmt: skip
    t = commands.add_parser("tabler", help="Tabler Icons as train/test/novel CSVs + zero-shot")
    t.add_argument("--icons", required=True, help="the unpacked @tabler/icons package")
    t.add_argument("--png", required=True, help="the unpacked @tabler/icons-png package")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--image-size", type=int, default=64, help="pixels per side; 0: keep 240")
    t.add_argument("--holdout", type=float, default=0.2, help="share of concepts held out")
    t.add_argument("--max-tags", type=int, default=4, help="tags per caption")
    t.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    o = commands.add_parser("openclipart", help="OpenClipart as train/test/novel CSVs + zero-shot")
    o.add_argument("--src", required=True, help="openclipart-svg and -png unpacked (dpkg-deb -x)")
    o.add_argument("--out", required=True, help="output folder")
    o.add_argument("--image-size", type=int, default=64, help="pixels per side; 0: keep")
    o.add_argument("--holdout", type=float, default=0.15, help="share of names held out")
    o.add_argument("--test-share", type=float, default=0.1, help="share of the rest tested")
    o.add_argument("--max-tags", type=int, default=4, help="keywords per caption")
    o.add_argument("--seed", type=int, default=0, help="seed of the held-out and test draws")
    f = commands.add_parser("fashion-mnist", help="Fashion-MNIST as train/test class folders")
    f.add_argument("--src", required=True, help="dataset-fashion-mnist unpacked (dpkg-deb -x)")
    f.add_argument("--out", required=True, help="output folder")
    x = commands.add_parser("tuxpaint", help="Tux Paint's stamps as sentence pairs + categories")
    x.add_argument("--src", required=True, help="tuxpaint-stamps-default unpacked (dpkg-deb -x)")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--image-size", type=int, default=64, help="pixels per side; 0: keep")
    return main


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="limoe: %(message)s")
    args = parser().parse_args(argv)
    try:
        prepare = {"tabler": tabler, "openclipart": openclipart, "fashion-mnist": fashion_mnist,
                   "tuxpaint": tuxpaint}  # fmt: skip
        if args.command in prepare:
            print(prepare[args.command](args))
            return
        if args.size < 1 or args.samples_per_shard < 1:
            raise ValueError("--size and --samples-per-shard must be >= 1")
        if args.split is None:
            args.split = SPLIT if args.format == "clip_benchmark" else "train"
        print(export(args))
    except (ValueError, OSError) as error:
        print(f"limoe-data: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
