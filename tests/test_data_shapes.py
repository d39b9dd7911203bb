"""The embedded shapes dataset: determinism, splits, rendering, captions, tokens, datamodule."""

from __future__ import annotations

import csv
import pickle
import warnings
from itertools import product

import numpy as np
import pytest
import torch
from PIL import Image

from limoe.data import (
    ShapesDataModule,
    ShapesDataset,
    export_csv,
    zeroshot_tasks,
)
from limoe.data.export import main as limoe_data
from limoe.data.shapes import (
    ATTRIBUTE_VALUES,
    BACKGROUND_RGB,
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOUR_RGB,
    COLOURS,
    NOISE_AMPLITUDE,
    NOVEL_PAIRS,
    POSITIONS,
    SEEN_PAIRS,
    SHAPES,
    SIZES,
    SPLITS,
    Attributes,
    render,
    sample_attributes,
    sample_table,
    shape_mask,
    split_seed,
)
from limoe.eval.plan import ZeroShotTask

STAGES = ("fit", "validate", "test")
# A train split without the default curriculum: partial captions (a fifth) from the first
# sample, no hard-negative groups.
PLAIN_TRAIN_SPLIT = {
    "partial_captions": 0.2,
    "partial_captions_from_step": 0,
    "hard_negatives": 0.0,
}


@pytest.fixture(scope="module")
def train_ds() -> ShapesDataset:
    return ShapesDataset("train", 3000, return_labels=True)


def _pairs(seed: int, split: str, n: int) -> set[tuple[int, int]]:
    table = sample_table(seed, split, np.arange(n))
    return set(zip(table["colour"].tolist(), table["shape"].tolist()))


# --------------------------------------------------------------------------- determinism


def test_same_seed_and_index_give_identical_samples():
    a, b = sample_attributes(0, 123), sample_attributes(0, 123)
    assert a == b
    assert render(a).tobytes() == render(b).tobytes()
    assert a.caption() == b.caption()


def test_samples_do_not_depend_on_dataset_size_or_order():
    small, big = ShapesDataset("val", 10), ShapesDataset("val", 500)
    for i in reversed(range(10)):
        assert small.caption(i) == big.caption(i)
        assert torch.equal(small[i][0], big[i][0])
    assert small.attributes(7) == sample_attributes(0, 7, "val")


def test_different_seeds_and_splits_give_different_samples():
    captions = {
        (seed, split): [sample_attributes(seed, i, split).caption() for i in range(50)]
        for seed in (0, 1)
        for split in ("train", "val", "test")
    }
    for (k1, c1), (k2, c2) in product(captions.items(), repeat=2):
        if k1 != k2:
            assert sum(x != y for x, y in zip(c1, c2)) > 35, (k1, k2)


def test_split_seeds_never_collide():
    seeds = [split_seed(seed, split) for seed in range(100) for split in SPLITS]
    assert len(set(seeds)) == len(seeds)
    with pytest.raises(ValueError):
        split_seed(0, "nope")
    with pytest.raises(ValueError):
        split_seed(-1, "train")


# --------------------------------------------------------------------------- splits


def test_novel_pairs_cover_every_colour_and_shape():
    assert len(NOVEL_PAIRS) == 8
    assert {c for c, _ in NOVEL_PAIRS} == set(range(len(COLOURS)))
    assert {s for _, s in NOVEL_PAIRS} == set(range(len(SHAPES)))
    assert set(SEEN_PAIRS) | set(NOVEL_PAIRS) == set(product(range(8), range(6)))
    assert not set(SEEN_PAIRS) & set(NOVEL_PAIRS)


def test_novel_pairs_never_occur_outside_the_novel_split():
    for split in ("train", "val", "test"):
        seen = _pairs(0, split, 4000)
        assert not seen & set(NOVEL_PAIRS), split
        assert seen == set(SEEN_PAIRS), split  # every seen pair does occur
    assert _pairs(0, "novel", 1000) == set(NOVEL_PAIRS)


def test_attributes_are_spread_over_all_values(train_ds):
    table = train_ds._table
    for name, values in [
        ("size", SIZES),
        ("position", POSITIONS),
        ("background", BACKGROUNDS),
        ("template", CAPTION_TEMPLATES),
    ]:
        counts = np.bincount(table[name], minlength=len(values))
        assert counts.min() > 0.5 * len(train_ds) / len(values), name


def test_test_split_captions_are_mostly_unique():
    ds = ShapesDataset("test", 1000)
    combos = {
        (a.colour, a.shape, a.size, a.position, a.background)
        for a in (ds.attributes(i) for i in range(len(ds)))
    }
    assert len(combos) >= 750
    assert len({ds.caption(i) for i in range(len(ds))}) >= 800


# --------------------------------------------------------------------------- captions and tokens


def test_every_caption_names_all_its_attributes(train_ds):
    for i in range(1000):
        attrs = train_ds.attributes(i)
        caption = train_ds.caption(i)
        for word in attrs.names.values():
            assert word in caption, (word, caption)


def test_tokens_decode_back_to_the_caption(train_ds):
    tokenizer = train_ds.tokenizer
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    for i in range(200):
        tokens = train_ds[i][1].tolist()
        assert tokens[0] == sot and eot in tokens  # nothing truncated
        text = tokenizer.decode(tokens[1 : tokens.index(eot)])
        assert "".join(text.split()) == "".join(train_ds.caption(i).lower().split())


# --------------------------------------------------------------------------- rendering


def test_shape_has_its_colour_and_corner_has_the_background(train_ds):
    for i in range(300):
        attrs = train_ds.attributes(i)
        image = train_ds.image_uint8(i)
        colour = np.array(COLOUR_RGB[COLOURS[attrs.colour]])
        mask = shape_mask(attrs)
        assert mask.sum() >= 20
        assert (image[mask] == colour).all()
        cx, cy = attrs.centre()
        if SHAPES[attrs.shape] != "ring":  # a ring's centre is its hole
            assert (image[int(cy), int(cx)] == colour).all()
        far_y = 0 if cy > 16 else 31
        far_x = 0 if cx > 16 else 31
        background = np.array(BACKGROUND_RGB[BACKGROUNDS[attrs.background]])
        assert np.abs(image[far_y, far_x].astype(int) - background).max() <= NOISE_AMPLITUDE


def test_shape_centroid_lies_in_the_named_cell(train_ds):
    for i in range(1000):
        attrs = train_ds.attributes(i)
        ys, xs = np.nonzero(shape_mask(attrs))
        row, col = divmod(attrs.position, 3)
        cell = 32 / 3
        assert row * cell <= ys.mean() + 0.5 < (row + 1) * cell, POSITIONS[attrs.position]
        assert col * cell <= xs.mean() + 0.5 < (col + 1) * cell, POSITIONS[attrs.position]


def test_large_shapes_are_larger_and_render_scales_with_image_size():
    small = Attributes(colour=0, shape=0, size=0, position=4, background=0)
    large = Attributes(colour=0, shape=0, size=1, position=4, background=0)
    assert shape_mask(large).sum() > 2 * shape_mask(small).sum()
    image = render(large, image_size=64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert 3.5 < shape_mask(large, 64).sum() / shape_mask(large, 32).sum() < 4.5


# --------------------------------------------------------------------------- dataset


def test_dataset_items(train_ds):
    image, tokens, labels = train_ds[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0
    expected = torch.from_numpy(train_ds.image_uint8(5)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(image, expected)
    assert tokens.shape == (32,) and tokens.dtype == torch.long
    attrs = train_ds.attributes(5)
    assert labels.tolist() == [getattr(attrs, task) for task in zeroshot_tasks()]
    assert len(ShapesDataset("train", 4)[0]) == 2
    with pytest.raises(IndexError):
        train_ds[len(train_ds)]


def test_cached_tokens_are_not_aliased(train_ds):
    tokens = train_ds[0][1]
    tokens.zero_()
    assert train_ds[0][1][0] == train_ds.tokenizer.sot_token_id


def test_dataset_pickles_for_worker_processes():
    ds = ShapesDataset("val", 20, context_length=24, return_labels=True)
    clone = pickle.loads(pickle.dumps(ds))
    for a, b in zip(ds[3], clone[3]):
        assert torch.equal(a, b)
    assert ds[3][1].shape == (24,)


def test_zeroshot_tasks():
    tasks = zeroshot_tasks()
    assert list(tasks) == ["colour", "shape", "size", "position", "background"]
    assert tasks["colour"].classnames == list(COLOURS)
    assert tasks["position"].classnames == list(POSITIONS)
    for task in tasks.values():
        assert isinstance(task, ZeroShotTask)
        assert task.classnames == list(ATTRIBUTE_VALUES[task.name])  # one task per attribute
        assert all(t.count("{}") == 1 for t in task.templates)
        assert len(task.prompts(task.classnames[0])) == len(task.templates)


# --------------------------------------------------------------------------- datamodule


def test_datamodule_loaders():
    dm = ShapesDataModule(
        train_size=100, val_size=30, test_size=20, novel_size=10, batch_size=16, eval_batch_size=25,
        **PLAIN_TRAIN_SPLIT,
    )  # fmt: skip
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 100 // 16  # drop_last
    images, tokens = train[0]
    assert images.shape == (16, 3, 32, 32) and tokens.shape == (16, 24)  # context_length

    (val,) = dm.val_dataloader()
    batch = next(iter(val))
    images, labels = batch["image"], batch["labels"]
    assert images.shape == (25, 3, 32, 32) and labels.shape == (25, 5)
    assert batch["index"].tolist() == list(range(25)) and batch["valid"].all()
    assert torch.equal(batch["text"][3], dm.dataset("val")[3][1])
    tasks = dm.eval_plan("validate").sets[0].tasks
    for column, task in enumerate(tasks):
        assert 0 <= labels[:, column].min() and labels[:, column].max() < len(task.classnames)

    test, novel = dm.test_dataloader()
    assert sum(len(b["image"]) for b in test) == 20 and sum(len(b["image"]) for b in novel) == 10
    novel_labels = torch.cat([b["labels"] for b in novel])
    assert {tuple(p) for p in novel_labels[:, :2].tolist()} <= set(NOVEL_PAIRS)
    prefixes = {stage: [s.prefix for s in dm.eval_plan(stage).sets] for stage in STAGES}
    assert prefixes == {"fit": ["val"], "validate": ["val"], "test": ["test", "test_novel"]}
    plan = dm.eval_plan("test")
    assert [s.tasks for s in plan.sets] == [tuple(zeroshot_tasks().values())] * 2
    assert (
        list(plan.tasks)
        == list(zeroshot_tasks())
        == ["colour", "shape", "size", "position", "background"]
    )  # the labels' order
    assert plan.tokenizer is dm.tokenizer is dm.dataset("val").tokenizer
    with pytest.raises(ValueError, match="unknown stage 'predict'"):
        dm.eval_plan("predict")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_size": 0},
        {"batch_size": 0},
        {"eval_batch_size": 0},
        {"train_size": 10},
        {"seed": -1},
        {"num_workers": -1},
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ShapesDataModule(**kwargs)


# --------------------------------------------------------------------------- export


def test_export_csv_round_trip(tmp_path):
    path = export_csv("test", 12, tmp_path / "csv", seed=3)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 12 and list(rows[0]) == ["filepath", "title"]
    for i, row in enumerate(rows):
        attrs = sample_attributes(3, i, "test")
        assert row["title"] == attrs.caption()
        with Image.open(path.parent / row["filepath"]) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), render(attrs))


def test_export_csv_through_limoe_data(tmp_path, capsys):
    limoe_data(["export", "shapes", "--format", "csv", "--split", "novel", "--size", "3",
                "--out", str(tmp_path)])  # fmt: skip
    assert (tmp_path / "novel.csv").exists() and len(list((tmp_path / "novel").iterdir())) == 3
    assert "wrote 3 samples" in capsys.readouterr().out
    with (tmp_path / "novel.csv").open(newline="") as f:
        titles = [row["title"] for row in csv.DictReader(f, delimiter="\t")]
    assert titles == [sample_attributes(0, i, "novel").caption() for i in range(3)]


def test_partial_captions_by_hand():
    from limoe.data.shapes import FULL_MENTION, partial_caption

    names = {"size": "small", "colour": "red", "shape": "ring", "position": "top left",
             "background": "navy"}  # fmt: skip
    assert partial_caption(names, 0b00010) == "a red shape"
    assert partial_caption(names, 0b01100, template=1) == "a photo of a ring in the top left."
    assert partial_caption(names, 0b10001) == "a small shape on a navy background"
    assert partial_caption(names, FULL_MENTION) == (
        "a small red ring in the top left on a navy background"
    )


def test_partial_captions_only_in_training_and_at_the_configured_share():
    dm = ShapesDataModule(train_size=4000, val_size=500, test_size=500, novel_size=500,
                          **{**PLAIN_TRAIN_SPLIT, "partial_captions": 0.25})  # fmt: skip
    dm.setup("fit")
    dm.setup("test")
    from limoe.data.shapes import FULL_MENTION

    train = dm.dataset("train")
    partial = [train.attributes(i).mention != FULL_MENTION for i in range(len(train))]
    assert 0.22 < sum(partial) / len(partial) < 0.28
    for split in ("val", "test", "novel"):
        ds = dm.dataset(split)
        assert all(ds.attributes(i).mention == FULL_MENTION for i in range(len(ds)))
    # Zero-shot prompts speak the partial-caption language.
    assert dm.eval_plan("test").tasks["position"].templates[0] == "a shape in the {}"


def test_partial_captions_start_at_the_configured_step():
    from limoe.data.shapes import FULL_MENTION

    dm = ShapesDataModule(train_size=640, batch_size=16, partial_captions=0.5,
                          partial_captions_from_step=10, hard_negatives=0.0)  # fmt: skip
    dm.setup("fit")
    train = dm.dataset("train")
    # The loader reads the split in order, so batch k holds samples 16k .. 16k + 15.
    for step, (_, tokens) in enumerate(dm.train_dataloader()):
        if step in (0, 9, 10, 39):
            expected = torch.stack([train[i][1] for i in range(16 * step, 16 * step + 16)])
            assert torch.equal(tokens, expected)
    partial = np.array([train.attributes(i).mention != FULL_MENTION for i in range(640)])
    assert not partial[:160].any()  # steps 0-9: full captions only
    assert 0.4 < partial[160:].mean() < 0.6
    # Every sample past the start keeps the draw it has without a curriculum.
    plain = ShapesDataset("train", 640, partial_captions=0.5)
    assert all(train.attributes(i) == plain.attributes(i) for i in range(160, 640))


def test_partial_captions_start_past_the_train_split_is_an_error():
    dm = ShapesDataModule(train_size=160, batch_size=16, partial_captions=0.2,
                          partial_captions_from_step=10)  # fmt: skip
    with pytest.raises(ValueError, match="partial_captions_from_step=10 starts past the end"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="partial_captions_from_step must be >= 0"):
        ShapesDataModule(partial_captions_from_step=-1)


def _objects(attrs) -> dict[str, int]:
    return {a: getattr(attrs, a) for a in ("colour", "shape", "size", "position", "background")}


@pytest.mark.parametrize(
    "attributes", [("shape",), ("position",), ("shape", "position"), ("shape", "size", "colour")]
)
def test_hard_negatives_form_factorial_groups_over_the_listed_attributes(attributes):
    k = len(attributes)
    n = 64 * 2**k
    plain = ShapesDataset("train", n)
    hard = ShapesDataset("train", n, hard_negatives=1.0, hard_negative_attributes=attributes)
    changed = set()
    for first in range(0, n, 2**k):
        assert hard.attributes(first) == plain.attributes(first)  # the group's original
        group = [_objects(hard.attributes(first + m)) for m in range(2**k)]
        assert len({tuple(g.values()) for g in group}) == 2**k  # all members differ
        for m, mine in enumerate(group):
            own = plain.attributes(first + m)
            got = hard.attributes(first + m)
            assert (got.template, got.jitter, got.noise) == (own.template, own.jitter, own.noise)
            assert (mine["colour"], mine["shape"]) in SEEN_PAIRS  # never a held-out pair
            for i, name in enumerate(attributes):  # flipping bit i changes attribute i alone
                other = group[m ^ (1 << i)]
                diff = [a for a in mine if mine[a] != other[a]]
                assert diff == [name], (first, m, mine, other)
                changed.add(name)
    assert changed == set(attributes)


def test_hard_negatives_share_and_validation():
    hard = ShapesDataset("train", 8000, hard_negatives=0.5)  # groups of 4: shape x position
    plain = ShapesDataset("train", 8000)
    edited = [
        _objects(hard.attributes(i)) != _objects(plain.attributes(i)) for i in range(1, 8000, 4)
    ]
    assert 0.45 < np.mean(edited) < 0.55
    for j, first in enumerate(range(0, 8000, 4)):  # a group is edited as a whole or not at all
        group = [_objects(hard.attributes(first + m)) for m in range(4)]
        if edited[j]:
            kept = {(g["colour"], g["size"], g["background"]) for g in group}
            assert len(kept) == 1
        else:
            assert group == [_objects(plain.attributes(first + m)) for m in range(4)]
    with pytest.raises(ValueError, match="hard negatives are a training recipe"):
        ShapesDataset("test", 10, hard_negatives=0.5)
    for bad in [("hue",), (), ("shape", "shape")]:
        with pytest.raises(ValueError, match="hard_negative_attributes must be distinct names"):
            ShapesDataset("train", 10, hard_negatives=0.5, hard_negative_attributes=bad)
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be a multiple of the hard-neg"):
        ShapesDataModule(batch_size=6, hard_negatives=1.0)
    with pytest.raises(ValueError, match=r"hard_negatives must be in \[0, 1\]"):
        ShapesDataset("train", 10, hard_negatives=1.5)


def test_a_run_longer_than_the_train_split_warns_that_the_curriculum_restarts():
    import lightning as L

    dm = ShapesDataModule(train_size=160, batch_size=16, **PLAIN_TRAIN_SPLIT)  # 10 steps a pass
    dm.trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False)
    wraps = r"train_size=160 lasts 10 steps but train_from_step \+ max_steps=20"
    with pytest.warns(UserWarning, match=wraps):
        dm.train_dataloader()
    dm.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.train_dataloader()
    # A continued run counts the steps it skips.
    dm = ShapesDataModule(train_size=160, batch_size=16, train_from_step=4, **PLAIN_TRAIN_SPLIT)
    dm.trainer = L.Trainer(max_steps=8, logger=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=wraps.replace("20", "12")):
        dm.train_dataloader()


def test_train_from_step_reads_the_samples_the_longer_run_reads_at_that_step():
    dm = ShapesDataModule(train_size=160, batch_size=16, **PLAIN_TRAIN_SPLIT)
    later = ShapesDataModule(train_size=160, batch_size=16, train_from_step=3, **PLAIN_TRAIN_SPLIT)
    batches = list(dm.train_dataloader())
    continued = list(later.train_dataloader())
    assert len(continued) == len(batches) - 3
    for ours, theirs in zip(continued, batches[3:]):
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    too_late = ShapesDataModule(train_size=160, batch_size=16, train_from_step=10,
                                **PLAIN_TRAIN_SPLIT)  # fmt: skip
    with pytest.raises(ValueError, match=r"train_from_step=10 starts past the end of the train "
                       r"split \(train_size=160\)"):  # fmt: skip
        too_late.train_dataloader()


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_sampler_from_a_step_reads_what_a_subset_from_that_index_reads(shuffle):
    """``ResumableSampler(start=StepIndex.first(step))`` on each of two ranks against torch's
    DistributedSampler over the Subset of the indices from there on."""
    from torch.utils.data import DistributedSampler, Subset

    from limoe.data.loading import ResumableSampler, StepIndex

    data = list(range(100))
    start = StepIndex(batch_size=4, world_size=2).first(3)
    assert start == 24 and StepIndex(4, 2).steps_per_pass(100) == 12
    subset = Subset(data, range(start, len(data)))
    for rank in (0, 1):
        ours = ResumableSampler(data, 4, start, num_replicas=2, rank=rank, shuffle=shuffle, seed=5)
        ref = DistributedSampler(subset, num_replicas=2, rank=rank, shuffle=shuffle, seed=5)
        assert list(ours) == [subset.indices[i] for i in ref]
