"""The embedded ``scenes`` image-caption benchmark: two coloured shapes per image, one left of
or above the other, on a noisy background, captioned "the red star left of the blue ring".

Built to be harder than ``shapes`` in the ways LIMoE's setting is: an image is 49 patches
(56 px, patch 8) against a context of 16 caption tokens (more than 3 image tokens per text
token, as the paper's 196 against 16); 8 colours x 10 shapes give 72 seen objects, every
caption binds two of them in order, and in-batch hard negatives differ by the binding or one
shape alone, so matching needs the whole caption. The ``novel`` split shows one of 8 held-out (colour, shape)
objects in every image: compositions never seen in training. Every draw is a pure function of
``(seed, split, index)``, as in ``shapes``.

Modules: ``scene`` (the vocabulary, ``Scene``, captions, token roles), ``sampling`` (the
hashed draws, hard negatives), ``render`` (the images), ``tasks`` (one zero-shot task per
caption slot), ``dataset`` (``ScenesDataset``).
"""

from limoe.data.scenes.dataset import ScenesDataset
from limoe.data.scenes.render import object_masks, render
from limoe.data.scenes.sampling import HARD_NEGATIVE_EDITS, row_scene, sample_table
from limoe.data.scenes.scene import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOUR_RGB,
    COLOURS,
    FULL_MENTION,
    NOVEL_OBJECT_NAMES,
    NOVEL_OBJECTS,
    PARTIAL_TEMPLATES,
    RELATIONS,
    SEEN_OBJECTS,
    SHAPES,
    SLOT_VALUES,
    SLOTS,
    Scene,
    caption_from,
    scene_roles,
)
from limoe.data.scenes.tasks import TASK_NAMES, slot_prompts, zeroshot_tasks

__all__ = [
    "BACKGROUNDS",
    "CAPTION_TEMPLATES",
    "COLOUR_RGB",
    "COLOURS",
    "FULL_MENTION",
    "HARD_NEGATIVE_EDITS",
    "NOVEL_OBJECT_NAMES",
    "NOVEL_OBJECTS",
    "PARTIAL_TEMPLATES",
    "RELATIONS",
    "SEEN_OBJECTS",
    "SHAPES",
    "SLOT_VALUES",
    "SLOTS",
    "Scene",
    "ScenesDataset",
    "TASK_NAMES",
    "caption_from",
    "object_masks",
    "render",
    "row_scene",
    "sample_table",
    "scene_roles",
    "slot_prompts",
    "zeroshot_tasks",
]
