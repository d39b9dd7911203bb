"""The embedded ``shapes`` image-caption dataset.

Procedurally generated, so it needs no download and trains a small LIMoE on a
laptop CPU in minutes. Each image shows one coloured shape of some size at one
cell of a 3x3 grid on a dark background; its caption names all five
attributes. The attributes double as zero-shot classification tasks, and a
fixed set of held-out (colour, shape) pairs gives a ``novel`` split that tests
compositional generalisation.

Every random choice of a sample is a pure function of ``(seed, split, index)``
(a counter-based hash, no global RNG state), so any sample can be produced
on its own, in any worker, in any order, and always looks the same.

Modules: ``attributes`` (the vocabulary, the pairs of each split, ``Attributes``), ``captions``
(full and partial captions, the role of each caption token), ``sampling`` (the hashed draws,
hard negatives), ``render`` (the images), ``tasks`` (the zero-shot tasks), ``dataset``
(``ShapesDataset``, the CSV export).
"""

from limoe.data.procedural import MEAN, STD
from limoe.data.shapes.attributes import (
    ATTRIBUTE_VALUES,
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    EDGE_MARGIN,
    JITTER,
    NOVEL_PAIR_NAMES,
    NOVEL_PAIRS,
    NUM_NOISE_PATTERNS,
    POSITIONS,
    SEEN_PAIRS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    Attributes,
)
from limoe.data.shapes.captions import (
    CAPTION_TEMPLATES,
    FULL_MENTION,
    MENTION_ORDER,
    PARTIAL_TEMPLATES,
    caption_roles,
    partial_caption,
)
from limoe.data.shapes.dataset import ShapesDataset, export_csv, rendered_samples
from limoe.data.shapes.render import NOISE_AMPLITUDE, draw_mask, render, shape_mask
from limoe.data.shapes.sampling import SPLITS, sample_attributes, sample_table, split_seed
from limoe.data.shapes.tasks import TASK_NAMES, attribute_prompts, zeroshot_tasks

__all__ = [
    "ATTRIBUTE_VALUES",
    "BACKGROUND_RGB",
    "BACKGROUNDS",
    "COLOUR_RGB",
    "COLOURS",
    "EDGE_MARGIN",
    "JITTER",
    "NOVEL_PAIR_NAMES",
    "NOVEL_PAIRS",
    "NUM_NOISE_PATTERNS",
    "POSITIONS",
    "SEEN_PAIRS",
    "SHAPES",
    "SIZE_RADIUS",
    "SIZES",
    "Attributes",
    "CAPTION_TEMPLATES",
    "FULL_MENTION",
    "MENTION_ORDER",
    "PARTIAL_TEMPLATES",
    "caption_roles",
    "partial_caption",
    "MEAN",
    "STD",
    "ShapesDataset",
    "export_csv",
    "rendered_samples",
    "NOISE_AMPLITUDE",
    "render",
    "shape_mask",
    "draw_mask",
    "SPLITS",
    "sample_attributes",
    "sample_table",
    "split_seed",
    "TASK_NAMES",
    "attribute_prompts",
    "zeroshot_tasks",
]
