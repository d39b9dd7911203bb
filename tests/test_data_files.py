"""open_clip's file formats: CSV of images, WebDataset shards, ImageFolder zero-shot trees,
image modes, bad samples, and ``limoe-data export`` - all on files the tests write."""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FILES_SMOKE
from hydra.utils import instantiate
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torchvision import transforms

from limoe.data import ImageTextDataModule, pairs
from limoe.data.csv import CsvSource, read_csv
from limoe.data.export import main as limoe_data
from limoe.data.imagefolder import DEFAULT_TEMPLATES, classname, imagefolder_task
from limoe.data.images import open_image, to_rgb
from limoe.data.pairs import PairDataset
from limoe.data.shapes import render, sample_attributes
from limoe.data.skips import SkipCounts
from limoe.data.transforms import (
    RandomResizedCrop,
    build_transform,
    normalize_images,
    split_normalize,
)
from limoe.data.webdataset import ShardSource, ShardStream, expand_urls, index_shards
from limoe.lit import ContrastiveModule
from limoe.train import compose, train

SIZE = 16
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # pixel p in 0..255 becomes p / 127.5 - 1


def eval_transform():
    return build_transform(SIZE, train=False, mean=MEAN, std=STD)


def solid(mode: str, colour, size=(SIZE, SIZE)) -> Image.Image:
    return Image.new(mode, size, colour)


def truncated_png() -> bytes:
    """A PNG cut in half: PIL identifies it from its header, decoding it fails."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def write_csv(path: Path, rows: list[tuple[str, str]], header=("filepath", "title"), sep="\t"):
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def csv_dir(tmp_path) -> Path:
    """A CSV of 5 good images in several modes and sizes, one missing file, one empty
    caption, one file that is not an image and one truncated image."""
    images = {
        "red.png": solid("RGB", (255, 0, 0)),
        "clear.png": solid("RGBA", (255, 0, 0, 0)),  # fully transparent red
        "grey.png": solid("L", 64),
        "wide.jpg": solid("RGB", (0, 0, 255), size=(48, 20)),
        "palette.png": solid("RGB", (0, 255, 0)).convert("P"),
    }
    (tmp_path / "img").mkdir()
    for name, image in images.items():
        image.save(tmp_path / "img" / name)
    Image.new("RGB", (SIZE, SIZE), (9, 9, 9)).save(tmp_path / "abs.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "img" / "cut.png").write_bytes(truncated_png())
    rows = [
        ("img/red.png", "a red square"),
        ("img/clear.png", "nothing to see"),
        ("img/missing.png", "a file that is not there"),
        ("img/grey.png", "a grey square"),
        ("img/wide.jpg", "a wide blue image"),
        ("img/palette.png", "  "),  # empty caption
        ("img/broken.png", "a broken file"),
        ("img/cut.png", "a truncated file"),
        (str(tmp_path / "abs.png"), "an absolute path"),
    ]
    write_csv(tmp_path / "pairs.csv", rows)
    return tmp_path


# --------------------------------------------------------------------------- images


def test_every_mode_becomes_rgb_and_transparency_is_composited():
    rgba = solid("RGBA", (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # white, not the hidden red
    assert to_rgb(rgba, background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    half = solid("RGBA", (255, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (255, 127, 127)  # 255*a + 255*(1-a), 0*a + 255*(1-a)
    assert to_rgb(solid("LA", (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = solid("RGB", (0, 255, 0)).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(solid("L", 64)).getpixel((0, 0)) == (64, 64, 64)
    assert to_rgb(solid("CMYK", (0, 0, 0, 0))).mode == "RGB"


def test_any_size_is_resized_and_centre_cropped_to_the_input_size():
    image = Image.new("RGB", (60, 20))
    image.paste((255, 255, 255), (15, 0, 45, 20))  # a white middle half
    pixels = eval_transform()(image)
    assert pixels.shape == (3, SIZE, SIZE)
    assert pixels.min() > 0.99  # the centre crop (a third of the width) is all white


def crop_boxes(get_params, image, scale, ratio, n=3000) -> np.ndarray:
    """(area share, log aspect) of ``n`` boxes; checks each lies inside the image."""
    width, height = image.size
    boxes = []
    for _ in range(n):
        top, left, h, w = get_params(image, scale, ratio)
        assert 0 <= top <= height - h and 0 <= left <= width - w
        boxes.append((h * w / (width * height), math.log(w / h)))
    return np.array(boxes)


def test_random_resized_crop_draws_the_boxes_torchvision_draws():
    image, scale, ratio = Image.new("RGB", (64, 48)), (0.08, 1.0), (3 / 4, 4 / 3)
    random.seed(0), torch.manual_seed(0)
    ours = crop_boxes(RandomResizedCrop.get_params, image, scale, ratio)
    theirs = crop_boxes(transforms.RandomResizedCrop.get_params, image, scale, ratio)
    # Means and spreads of area share and aspect agree within sampling error (n = 3000).
    np.testing.assert_allclose(ours.mean(0), theirs.mean(0), atol=0.02)
    np.testing.assert_allclose(ours.std(0), theirs.std(0), atol=0.02)
    assert ours[:, 0].min() >= 0.07 and abs(ours[:, 1]).max() <= math.log(4 / 3) + 0.1
    # No box fits a 100 x 10 strip at aspect 1 and 90 % of its area: both fall back to the
    # same centred square.
    strip = Image.new("RGB", (100, 10))
    expected = transforms.RandomResizedCrop.get_params(strip, (0.9, 1.0), (1.0, 1.0))
    assert (
        RandomResizedCrop.get_params(strip, (0.9, 1.0), (1.0, 1.0)) == expected == (0, 45, 10, 10)
    )


def test_random_resized_crop_of_the_whole_image_is_torchvisions_resize():
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    args = (SIZE, (1.0, 1.0), (1.0, 1.0), transforms.InterpolationMode.BICUBIC)
    ours, theirs = RandomResizedCrop(*args)(image), transforms.RandomResizedCrop(*args)(image)
    assert ours.size == (SIZE, SIZE) and np.array_equal(np.array(ours), np.array(theirs))
    train = build_transform(SIZE, train=True)
    assert any(type(t) is RandomResizedCrop for t in train.transforms)


def test_random_resized_crop_takes_tensors_as_torchvision_does():
    crop = RandomResizedCrop(SIZE, scale=(0.5, 1.0))
    random.seed(0)
    assert crop(torch.rand(3, 40, 30)).shape == (3, SIZE, SIZE)


def test_uint8_images_normalised_later_equal_the_whole_transform():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), np.uint8))
    whole = build_transform(SIZE, True, MEAN, STD, {"scale": (0.3, 0.6)})
    part, normalize = split_normalize(whole)
    random.seed(5), torch.manual_seed(5)
    expected = whole(image)
    random.seed(5), torch.manual_seed(5)
    pixels = part(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(normalize_images(pixels[None], normalize)[0], expected)
    # Random erasing works on the normalised tensor: such a transform stays whole.
    erasing = build_transform(SIZE, True, augment={"use_timm": True, "re_prob": 0.5})
    assert split_normalize(erasing) == (erasing, None)


# --------------------------------------------------------------------------- CSV


def test_csv_rows_skip_missing_files_empty_captions_and_non_images_with_their_paths(
    csv_dir, caplog
):
    counts = SkipCounts("pairs")
    with caplog.at_level(logging.WARNING, "limoe.data"):
        rows = read_csv(csv_dir / "pairs.csv", counts=counts)
        counts.check(max_skipped_fraction=0.5)
    assert [Path(p).name for p, _ in rows] == [
        "red.png", "clear.png", "grey.png", "wide.jpg", "cut.png", "abs.png",
    ]  # fmt: skip
    assert rows[0] == (str(csv_dir / "img/red.png"), "a red square")
    assert "missing.png" in caplog.text and "palette.png" in caplog.text
    assert "undecodable" in caplog.text and "broken.png" in caplog.text
    assert "skipped 3 of 9 samples (1 missing file, 1 empty caption, 1 undecodable)" in caplog.text
    assert counts.totals() == {"rows": 9, "skipped_missing_file": 1, "skipped_empty_caption": 1,
                               "skipped_undecodable": 1, "skipped_unreadable_row": 0}  # fmt: skip
    assert len(read_csv(csv_dir / "pairs.csv", check_images=False)) == 7  # broken.png kept


def test_csv_without_the_named_columns_fails_naming_its_columns(csv_dir):
    path = write_csv(csv_dir / "other.csv", [("a.png", "x")], header=("image", "caption"))
    with pytest.raises(ValueError, match=r"no column 'filepath', 'title'.*\['image', 'caption'\]"):
        read_csv(path)
    rows = read_csv(write_csv(csv_dir / "c.csv", [("img/red.png", "red")], ("image", "caption"), ","),
                    img_key="image", caption_key="caption", separator=",")  # fmt: skip
    assert rows == [(str(csv_dir / "img/red.png"), "red")]


def test_pair_dataset_decodes_every_mode_and_stands_in_for_a_broken_image(csv_dir, caplog):
    tokenizer = SimpleTokenizer(context_length=12)
    dataset = PairDataset(read_csv(csv_dir / "pairs.csv"), eval_transform(), SIZE, tokenizer)
    white = torch.ones(3, SIZE, SIZE)
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, SIZE, SIZE)
    image, tokens = dataset[0]
    assert torch.allclose(image, red, atol=1e-6)
    assert torch.equal(tokens, tokenizer(["a red square"])[0])
    assert torch.allclose(dataset[1][0], white, atol=1e-6)  # transparent -> white
    assert torch.allclose(dataset[2][0], torch.full((3, SIZE, SIZE), 64 / 127.5 - 1), atol=1e-2)
    with caplog.at_level(logging.WARNING, "limoe.data"):
        sample = dataset.sample(4)
        image, tokens = dataset[4]  # cut: replaced by sample (4 + 7919) % 6 = 3, wide.jpg
    assert not sample["valid"] and torch.equal(sample["image"], torch.zeros(3, SIZE, SIZE))
    assert "cut.png" in caplog.text
    assert dataset.counts.totals()["skipped_undecodable"] == 2  # found while loading, twice
    assert torch.equal(image, dataset[3][0]) and torch.equal(tokens, dataset[3][1])


@pytest.mark.parametrize("cache_bytes", [1 << 20, 0])
def test_captions_and_images_are_decoded_once_per_process(csv_dir, monkeypatch, cache_bytes):
    """Tokens are kept for every caption; decoded images while ``IMAGE_CACHE_BYTES`` lasts."""
    monkeypatch.setattr(pairs, "IMAGE_CACHE_BYTES", cache_bytes)
    tokenised, decoded = [], []
    tokenizer = SimpleTokenizer(context_length=8)

    def counting_tokenizer(texts):
        tokenised.extend(texts)
        return tokenizer(texts)

    def counting_open(source, background):
        decoded.append(source)
        return open_image(source, background)

    monkeypatch.setattr(pairs, "open_image", counting_open)
    rows = read_csv(csv_dir / "pairs.csv")
    dataset = PairDataset(rows, build_transform(SIZE, False), SIZE, tokenizer=counting_tokenizer)
    epochs = [[dataset.sample(i) for i in range(len(dataset))] for _ in range(2)]
    assert sorted(tokenised) == sorted(c for _, c in rows) and len(tokenised) == len(rows)
    for (_, caption), sample in zip(rows, epochs[1]):
        assert torch.equal(sample["text"], tokenizer([caption])[0])
    # The truncated image fails to decode each time it is met; the others once while cached.
    readable = [p for p, _ in rows if not p.endswith("cut.png")]
    assert sorted(decoded) == sorted((readable if cache_bytes else 2 * readable) + 2 * [
        p for p, _ in rows if p.endswith("cut.png")
    ])  # fmt: skip
    for first, second in zip(*epochs):
        assert torch.equal(first["image"], second["image"])  # eval transform: deterministic


def test_csv_datamodule_trains_on_shuffled_full_batches(csv_dir, device):
    dm = ImageTextDataModule(train_data=str(csv_dir / "pairs.csv"), batch_size=2, seed=3,
                             image_size=SIZE)  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    first, second = ([b[1].tolist() for b in loader] for _ in range(2))
    assert len(first) == 3 and all(len(b) == 2 for b in first)  # 6 readable rows, drop_last
    assert first != second  # a new order each epoch
    # Workers send uint8 images; the hook the Trainer calls on the device (``--device``)
    # normalises them to what the split's own (float) dataset gives.
    images, tokens = next(iter(loader))
    assert images.dtype == torch.uint8
    images, tokens = images.to(device), tokens.to(device)
    normalised, same_tokens = dm.on_after_batch_transfer((images, tokens), 0)
    assert normalised.dtype == torch.float32 and same_tokens is tokens
    assert normalised.device.type == device.type
    normalised, tokens = normalised.cpu(), tokens.cpu()
    by_caption = {tuple(t.tolist()): image for image, t in zip(normalised, tokens)}
    matched = 0
    for image, text in (dm.dataset("train")[i] for i in range(6)):
        if tuple(text.tolist()) in by_caption:  # solid colours: any crop gives the same
            torch.testing.assert_close(by_caption.pop(tuple(text.tolist())), image)
            matched += 1
    assert matched == len(tokens) == 2
    evaluation = {"image": normalised}
    assert dm.on_after_batch_transfer(evaluation, 0) is evaluation


# --------------------------------------------------------------------------- shards


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def png(colour) -> bytes:
    buffer = io.BytesIO()
    solid("RGB", colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path) -> Path:
    """Two shards: 10 good pairs (caption ``pair i``, grey level 20 i) among a broken
    image, a sample without caption, one with an empty caption and one without image."""
    good = [{f"s{i:02d}.png": png((20 * i,) * 3), f"s{i:02d}.txt": f"pair {i}".encode()}
            for i in range(10)]  # fmt: skip
    bad = [
        {"b0.png": b"garbage", "b0.txt": b"broken image"},
        {"b1.png": png((1, 2, 3))},
        {"b2.png": png((1, 2, 3)), "b2.txt": b"   "},
        {"b3.txt": b"no image"},
    ]
    write_tar(tmp_path / "000000.tar", good[:5] + bad[:2])
    write_tar(tmp_path / "000001.tar", bad[2:] + good[5:])
    return tmp_path


def test_index_shards_reads_members_by_offset_and_skips_bad_samples(shards, caplog):
    urls = expand_urls(str(shards / "{000000..000001}.tar"))
    with caplog.at_level(logging.WARNING, "limoe.data"):
        items = index_shards(urls)
    assert [caption for _, caption in items] == [f"pair {i}" for i in range(10)]
    assert "b0" in caplog.text and "b1" in caplog.text and "b3" in caplog.text
    assert np.asarray(open_image(items[6][0])).max() == 20 * 6
    with pytest.raises(ValueError, match="000002.tar"):
        expand_urls(str(shards / "{000000..000002}.tar"))


def stream(shards: Path, **kwargs) -> ShardStream:
    tokenizer = SimpleTokenizer(context_length=8)
    args = {"batch_size": 2, "num_samples": 6, "seed": 0, "shuffle_buffer": 4, **kwargs}
    return ShardStream(expand_urls(str(shards / "{000000..000001}.tar")), eval_transform(),
                       tokenizer, **args)  # fmt: skip


def levels(batch) -> list[int]:
    return [round((v + 1) * 127.5 / 20) for v in batch[0][:, 0, 0, 0].tolist()]


def test_shard_stream_is_deterministic_per_epoch_and_skips_bad_samples(shards, caplog):
    data = stream(shards)
    assert len(data) == 3
    with caplog.at_level(logging.WARNING, "limoe.data"):
        epoch0 = [levels(b) for b in data]
        again = [levels(b) for b in data]
        data.resume_at(1, 0)
        epoch1 = [levels(b) for b in data]
    assert len(epoch0) == 3 and all(len(b) == 2 for b in epoch0)
    assert epoch0 == again and epoch0 != epoch1
    assert all(0 <= v < 10 for b in epoch0 + epoch1 for v in b)  # only good pairs
    assert "skipping sample" in caplog.text


def test_shard_stream_resumes_after_the_batches_already_trained_on(shards):
    data = stream(shards)
    data.resume_at(2, 0)
    whole = [levels(b) for b in data]
    data.resume_at(2, 2)
    assert [levels(b) for b in data] == whole[2:]
    other_rank = stream(shards, rank=1, world_size=2, num_samples=12)
    assert [levels(b) for b in other_rank] != whole


def test_shard_stream_needs_a_batch_per_process(shards):
    with pytest.raises(ValueError, match="train_num_samples=3"):
        stream(shards, num_samples=3, world_size=2)


# --------------------------------------------------------------------------- ImageFolder


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "zs"
    colours = {"golden_retriever": (200, 150, 0), "sea-lion": (90, 90, 90), "cat": (0, 0, 0)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for j in range(2):
            solid("RGB", colour).save(root / name / f"{j}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "bad.jpg").write_bytes(truncated_png())
    return root


def test_imagefolder_task_names_classes_after_folders(folder):
    task, items, labels = imagefolder_task("pets", folder)
    assert task.classnames == ["cat", "golden retriever", "sea lion"]  # torchvision's order
    assert task.templates == list(DEFAULT_TEMPLATES)
    assert len(items) == 7 and labels == [0, 0, 0, 1, 1, 2, 2]  # notes.txt ignored
    assert classname("a_b-c") == "a b c"
    task, _, _ = imagefolder_task("pets", folder, ["itap of a {}."])
    assert task.templates == ["itap of a {}."]
    with pytest.raises(ValueError, match=r"templates: 'x' must hold one '\{\}'"):
        imagefolder_task("pets", folder, ["x"])
    with pytest.raises(ValueError, match="is not a directory"):
        imagefolder_task("pets", folder / "nope")


def test_imagefolder_test_loader_marks_the_broken_image_invalid(folder):
    dm = ImageTextDataModule(zeroshot={"pets": {"root": str(folder)}}, image_size=SIZE)
    (eval_set,) = dm.eval_plan("test").sets
    assert eval_set.prefix == "test" and [task.name for task in eval_set.tasks] == ["pets"]
    assert eval_set.tasks[0].classnames == ["cat", "golden retriever", "sea lion"]
    assert dm.eval_plan("validate").sets == ()
    (loader,) = dm.test_dataloader()
    batch = next(iter(loader))
    assert batch["labels"][:, 0].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert batch["valid"].tolist() == [True, True, False, True, True, True, True]  # cat/bad.jpg
    assert "text" not in batch


# --------------------------------------------------------------------------- configs


def test_data_configs_compose_and_instantiate(csv_dir, shards):
    cfg = compose(["data=csv", f"data.train_data={csv_dir / 'pairs.csv'}"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageTextDataModule)
    assert dm.sources == {"train": CsvSource(str(csv_dir / "pairs.csv"))}
    assert cfg.model.image_size == cfg.data.image_size
    pattern = str(shards / "{000000..000001}.tar")
    cfg = compose(["data=webdataset", f"data.train_data='{pattern}'"])
    dm = instantiate(cfg.data)
    assert dm.sources == {"train": ShardSource(pattern)} and dm.train_num_samples == 256000
    assert dm.sources["train"].urls == [str(shards / f"00000{i}.tar") for i in (0, 1)]
    with pytest.raises(ValueError, match="cannot tell its format"):
        ImageTextDataModule(train_data="pairs.parquet")
    with pytest.raises(ValueError, match="train_num_samples must be set"):
        ImageTextDataModule(train_data=pattern)
    with pytest.raises(ValueError, match="data.zeroshot.x needs a root"):
        ImageTextDataModule(zeroshot={"x": {}})


# --------------------------------------------------------------------------- export


def test_export_shapes_as_shards_round_trips(tmp_path, capsys):
    limoe_data(["export", "shapes", "--split", "val", "--size", "5", "--samples-per-shard", "2",
                "--seed", "4", "--out", str(tmp_path)])  # fmt: skip
    assert "wrote 5 pairs to 3 shards" in capsys.readouterr().out
    items = index_shards(expand_urls(str(tmp_path / "{000000..000002}.tar")))
    for i, (source, caption) in enumerate(items):
        attrs = sample_attributes(4, i, "val")
        assert caption == attrs.caption()
        assert np.array_equal(np.asarray(open_image(source)), render(attrs))


def test_export_csv_as_shards_and_shapes_as_folders(csv_dir, tmp_path, capsys):
    limoe_data(["export", str(csv_dir / "pairs.csv"), "--out", str(tmp_path / "s")])
    assert "wrote 6 pairs to 1 shards" in capsys.readouterr().out
    items = index_shards([str(tmp_path / "s/000000.tar")])
    assert [c for _, c in items][:2] == ["a red square", "nothing to see"]
    limoe_data(["export", "shapes", "--format", "imagefolder", "--task", "position",
                "--split", "test", "--size", "20", "--out", str(tmp_path / "f")])  # fmt: skip
    task, items, labels = imagefolder_task("position", tmp_path / "f")
    assert len(items) == 20 and set(task.classnames) <= {"top left", "centre", "bottom",
        "top", "top right", "left", "right", "bottom left", "bottom right"}  # fmt: skip
    for (path, _), label in zip(items, labels):
        index = int(Path(path).stem)
        assert task.classnames[label] == sample_attributes(0, index, "test").names["position"]


def test_export_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        limoe_data(["export", str(tmp_path / "none.csv"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert err.startswith("limoe-data: error:") and "none.csv does not exist" in err
    assert len(err.splitlines()) == 1


# --------------------------------------------------------------------------- training


def test_train_on_csv_reports_retrieval_and_imagefolder_zeroshot_without_broken_samples(
    csv_dir, folder, tmp_path
):
    """limoe-train data=csv with an ImageFolder task: the metrics leave out the unreadable
    images and equal a plain recomputation from the saved weights."""
    csv_path = csv_dir / "pairs.csv"
    overrides = [
        *FILES_SMOKE, "data=csv", f"data.train_data={csv_path}", f"data.test_data={csv_path}", "data.batch_size=2", f"+data.zeroshot.pets.root={folder}",
        "+data.zeroshot.pets.templates=['a photo of a {}.', 'a {}']", "trainer.max_steps=3",
        "trainer.val_check_interval=3",
    ]  # fmt: skip
    metrics = train(compose(overrides, tmp_path))  # no val data: no validation, no routing history
    assert {"test/pets_zeroshot_top1", "test/pets_zeroshot_top5", "test/image_to_text_R@1",
            "test/text_to_image_R@5"} <= set(metrics)  # fmt: skip
    module = ContrastiveModule.load_from_checkpoint(tmp_path / "checkpoints/last.ckpt")
    model, tokenizer = module.model.eval(), SimpleTokenizer(context_length=24)
    transform = build_transform(32, train=False)  # open_clip's mean and std, as configured

    def embed_images(paths):
        images = torch.stack([transform(open_image(p)) for p in paths])
        return torch.nn.functional.normalize(model.encode_image(images), dim=-1)

    def embed_texts(texts):
        return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)

    with torch.no_grad():
        rows = [r for r in read_csv(csv_path) if not r[0].endswith("cut.png")]
        logits = embed_images([p for p, _ in rows]) @ embed_texts([c for _, c in rows]).T
        correct = logits.diagonal().unsqueeze(1)
        r1 = ((logits >= correct).sum(1) == 1).float().mean().item()
        task, items, labels = imagefolder_task("pets", folder, ["a photo of a {}.", "a {}"])
        keep = [i for i, (p, _) in enumerate(items) if not p.endswith("bad.jpg")]
        classes = torch.stack([
            torch.nn.functional.normalize(embed_texts([t.format(c) for t in task.templates]).mean(0), dim=0)
            for c in task.classnames
        ])  # fmt: skip
        predicted = (embed_images([items[i][0] for i in keep]) @ classes.T).argmax(1)
        top1 = (predicted == torch.tensor([labels[i] for i in keep])).float().mean().item()
    assert metrics["test/image_to_text_R@1"] == pytest.approx(r1, abs=1e-6)
    assert metrics["test/pets_zeroshot_top1"] == pytest.approx(top1, abs=1e-6)
    assert metrics["test/pets_zeroshot_top5"] == 1.0  # three classes


def test_train_streams_shards(shards, tmp_path):
    pattern = str(shards / "{000000..000001}.tar")
    overrides = [*FILES_SMOKE, "data=webdataset", f"data.train_data='{pattern}'",
                 "data.train_num_samples=4", "data.batch_size=2", "trainer.max_steps=5",
                 "trainer.val_check_interval=2", "test=false"]  # fmt: skip
    assert train(compose(overrides, tmp_path)) == {}
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert ckpt["global_step"] == 5 and loader_state == [{"epoch": 2, "batches": 1}]  # 2 a epoch
