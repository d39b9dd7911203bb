"""The embedded scenes benchmark: captions and token roles by hand, the token ratio, splits and
held-out objects, geometry that matches the relation, hard-negative groups, the datamodule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from limoe.data import ScenesDataModule, ScenesDataset
from limoe.data.scenes import (
    COLOUR_RGB,
    COLOURS,
    NOVEL_OBJECTS,
    RELATIONS,
    SEEN_OBJECTS,
    SHAPES,
    SLOTS,
    Scene,
    caption_from,
    object_masks,
    render,
    sample_table,
    scene_roles,
    slot_prompts,
    zeroshot_tasks,
)
from limoe.train import compose

NAMES = {
    "first_colour": "aqua",
    "first_shape": "ring",
    "relation": "left of",
    "second_colour": "red",
    "second_shape": "star",
}


@pytest.fixture(scope="module")
def train_ds() -> ScenesDataset:
    return ScenesDataset("train", 2000, return_labels=True)


def test_captions_by_hand():
    assert caption_from(NAMES) == "the aqua ring left of the red star"
    assert caption_from(NAMES, template=1) == "a photo of the aqua ring left of the red star."
    first_colour, second_shape = 1 << 0, 1 << 4
    assert caption_from(NAMES, first_colour | second_shape) == "the aqua shape and the star"
    assert caption_from(NAMES, 1 << 2, template=1) == "a photo of the shape left of the shape."
    assert slot_prompts("first_shape") == [
        "the {} and the shape",
        "a photo of the {} and the shape.",
    ]
    assert list(zeroshot_tasks()) == list(SLOTS)
    assert zeroshot_tasks()["relation"].classnames == ["left of", "above"]


def test_token_roles_by_hand(train_ds):
    scene = Scene(COLOURS.index("aqua"), SHAPES.index("ring"), 0, COLOURS.index("aqua"),
                  SHAPES.index("star"))  # fmt: skip
    tokens = train_ds.tokens(scene.caption())
    words = [train_ds.tokenizer.decode([int(t)]).strip() for t in tokens[:9]]
    roles = scene_roles(scene, tokens, train_ds.tokenizer)
    # "left of" is two tokens; the second "aqua" is found after the first object, not on it.
    assert words == ["<start_of_text>", "the", "aqua", "ring", "left", "of", "the", "aqua", "star"]
    assert roles[:11] == ["start/end", "other", "colour", "shape", "relation", "relation",
                          "other", "colour", "shape", "start/end", "other"]  # fmt: skip


def test_images_outnumber_caption_tokens_three_to_one(tmp_path):
    cfg = compose(["data=scenes"], output_dir=tmp_path)
    patches = (cfg.data.image_size // cfg.size.patch_size) ** 2
    assert patches >= 3 * cfg.data.context_length
    # No caption of any split is cut: its end-of-text token is inside the context.
    for split in ("train", "test", "novel"):
        ds = ScenesDataset(split, 400, context_length=cfg.data.context_length,
                           partial_captions=0.5 if split == "train" else 0.0)  # fmt: skip
        eot = ds.tokenizer.eot_token_id
        assert all(eot in ds.tokens(ds.caption(i)).tolist() for i in range(400))


def test_samples_are_pure_functions_of_seed_split_and_index():
    a = sample_table(0, "train", [5, 17, 400])
    b = sample_table(0, "train", np.array([400, 17, 5]))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name][::-1])
    c = sample_table(1, "train", [5, 17, 400])
    d = sample_table(0, "test", [5, 17, 400])
    assert any((a[n] != c[n]).any() for n in SLOTS) and any((a[n] != d[n]).any() for n in SLOTS)


def _objects(table, which: str) -> set[tuple[int, int]]:
    return set(zip(table[f"{which}_colour"].tolist(), table[f"{which}_shape"].tolist()))


def test_held_out_objects_appear_only_in_the_novel_split_once_per_image():
    for split in ("train", "val", "test"):
        table = sample_table(0, split, np.arange(3000))
        assert not (_objects(table, "first") | _objects(table, "second")) & set(NOVEL_OBJECTS)
    novel = sample_table(0, "novel", np.arange(3000))
    held = set(NOVEL_OBJECTS)
    first = [o in held for o in zip(novel["first_colour"], novel["first_shape"])]
    second = [o in held for o in zip(novel["second_colour"], novel["second_shape"])]
    assert all(a != b for a, b in zip(first, second))  # exactly one per image
    assert 0.4 < np.mean(first) < 0.6 and _objects(novel, "first") & held == held
    assert len(SEEN_OBJECTS) == 72


def test_images_show_the_relation_the_caption_names(train_ds):
    for i in range(300):
        scene = train_ds.scene(i)
        first, second = object_masks(scene, 56)
        assert first.any() and second.any() and not (first & second).any()
        (x1, y1), (x2, y2) = (np.argwhere(m)[:, ::-1].mean(0) for m in (first, second))
        if RELATIONS[scene.relation] == "left of":
            assert x2 - x1 > 1.5 * abs(y2 - y1) + 5
        else:
            assert y2 - y1 > 1.5 * abs(x2 - x1) + 5
        image = train_ds.image_uint8(i)
        for mask, colour in zip((first, second), (scene.first_colour, scene.second_colour)):
            assert (image[mask] == COLOUR_RGB[COLOURS[colour]]).all()
        assert not (first | second)[[0, -1]].any() and not (first | second)[:, [0, -1]].any()


def test_hard_negatives_differ_by_the_binding_or_a_shape_alone():
    table = sample_table(0, "train", np.arange(400), hard_negatives=1.0,
                         hard_negative_attributes=["binding", "shape"])  # fmt: skip
    for start in range(0, 400, 4):
        base, binding, shape, both = (
            {n: int(table[n][start + m]) for n in SLOTS} for m in range(4)
        )
        assert len({tuple(m.values()) for m in (base, binding, shape, both)}) == 4
        for member in (base, binding, shape, both):
            assert member["relation"] == base["relation"]
            for which in ("first", "second"):
                assert (member[f"{which}_colour"], member[f"{which}_shape"]) in SEEN_OBJECTS
        # binding: same shapes, the colours traded (or the first recoloured)
        assert (binding["first_shape"], binding["second_shape"]) == (
            base["first_shape"], base["second_shape"])  # fmt: skip
        swapped = (binding["first_colour"], binding["second_colour"]) == (
            base["second_colour"], base["first_colour"])  # fmt: skip
        recoloured = (binding["second_colour"] == base["second_colour"]
                      and binding["first_colour"] != base["first_colour"])  # fmt: skip
        assert swapped or recoloured
        # shape: same colours, exactly one shape changed; with both, binding's colours
        for member, colours_of in ((shape, base), (both, binding)):
            assert [member[f"{w}_colour"] for w in ("first", "second")] == [
                colours_of[f"{w}_colour"] for w in ("first", "second")]  # fmt: skip
            changed = [member[f"{w}_shape"] != base[f"{w}_shape"] for w in ("first", "second")]
            assert sum(changed) == 1
    relation = sample_table(0, "train", np.arange(8), hard_negatives=1.0,
                            hard_negative_attributes=["relation"])  # fmt: skip
    assert relation["relation"][1] == 1 - relation["relation"][0]
    with pytest.raises(ValueError, match="hard_negative_attributes must be distinct names"):
        sample_table(0, "train", np.arange(8), hard_negatives=1.0,
                     hard_negative_attributes=["colour"])  # fmt: skip


def test_datamodule_batches_and_labels(tmp_path):
    dm = ScenesDataModule(train_size=64, val_size=20, test_size=20, novel_size=20,
                          batch_size=16, eval_batch_size=10, partial_captions_from_step=2)  # fmt: skip
    dm.setup()
    images, tokens = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 56, 56) and tokens.shape == (16, 16)
    assert -1.0 <= float(images.min()) and float(images.max()) <= 1.0
    plan = dm.eval_plan("test")
    assert [s.prefix for s in plan.sets] == ["test", "test_novel"]
    assert [t.name for t in plan.sets[0].tasks] == list(SLOTS)
    sample = plan.sets[1].samples[3]
    scene = dm.dataset("novel").scene(3)
    assert sample["labels"].tolist() == [getattr(scene, s) for s in SLOTS]
    torch.testing.assert_close(
        sample["image"], torch.from_numpy(render(scene, 56)).permute(2, 0, 1) / 127.5 - 1.0
    )
