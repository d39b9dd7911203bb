"""Sampling: every draw of a scene is a pure function of ``(seed, split, index)`` (the
counter-based hash of ``limoe.data.shapes.sampling``), whole tables at once; hard negatives
turn runs of train samples into groups of binding, shape and relation edits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from limoe.data.scenes.scene import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOURS,
    FULL_MENTION,
    NOVEL_OBJECTS,
    RELATIONS,
    SEEN_OBJECTS,
    SHAPES,
    Scene,
)
from limoe.data.shapes.attributes import NUM_NOISE_PATTERNS
from limoe.data.shapes.sampling import (
    SPLITS,
    check_groups,
    checked_indices,
    nth_true,
    random_words,
    split_seed,
    unit_float,
)

__all__ = ["HARD_NEGATIVE_EDITS", "SPLITS", "row_scene", "sample_table"]

# Geometry, as fractions of the image side. Objects have a radius of 0.13-0.17 (7-10 px at
# 56 px: two to three patches across, the least that lets a small tower tell a ring from a
# circle); a shape reaches at most 1.25 radii from its centre (a triangle's tip). The first
# object's centre lies 0.22-0.29 along the relation's axis and the second's 0.71-0.78, so
# the two never touch nor leave the image; across the axis both lie in 0.23-0.77 and within
# 0.12 of each other: the centres are more than three times as far apart along the axis.
NEAR, FAR, SPAN = 0.22, 0.71, 0.07
ACROSS_LOW, ACROSS_HIGH, ACROSS_GAP = 0.23, 0.77, 0.12
RADIUS_LOW, RADIUS_SPAN = 0.13, 0.04

# Hard-negative edits: ``binding`` gives each shape the other's colour (the same words in
# another binding), ``shape`` gives one of the objects another shape, ``relation`` turns
# "left of" into "above" and back.
HARD_NEGATIVE_EDITS: tuple[str, ...] = ("binding", "shape", "relation")
_EDIT_STREAM = 0x5CE7E

_SEEN = np.zeros((len(COLOURS), len(SHAPES)), dtype=bool)
_SEEN[tuple(np.array(SEEN_OBJECTS).T)] = True


def sample_table(
    seed: int,
    split: str,
    indices: Sequence[int] | np.ndarray,
    partial_captions: float = 0.0,
    partial_from: int = 0,
    hard_negatives: float = 0.0,
    hard_negative_attributes: Sequence[str] = ("binding", "shape"),
) -> dict[str, np.ndarray]:
    """The scenes of many samples at once, as arrays keyed by field name.

    A share ``partial_captions`` of the samples with index ``>= partial_from`` name a random
    non-empty subset of the five slots (see ``caption_from``); the train split, read in
    order, is then a curriculum as in ``shapes``. A share ``hard_negatives`` of the aligned
    runs of ``2**k`` samples become groups over the ``k`` edits listed (applied in order).
    """
    idx = checked_indices(indices, partial_captions, partial_from)
    table = _independent_table(seed, split, idx, partial_captions, partial_from)
    if hard_negatives > 0:
        _edit_groups(table, seed, split, idx, hard_negatives, hard_negative_attributes)
    return table


def _independent_table(
    seed: int, split: str, idx: np.ndarray, partial_captions: float = 0.0, partial_from: int = 0
) -> dict[str, np.ndarray]:
    """Every sample drawn on its own from its (seed, split, index) hash."""
    w = random_words(split_seed(seed, split), idx, 16)

    def pick(col: int, n: int) -> np.ndarray:
        return (w[:, col] % np.uint64(n)).astype(np.int64)

    def uniform(col: int) -> np.ndarray:
        return unit_float(w[:, col])

    seen = np.array(SEEN_OBJECTS, dtype=np.int64)
    first, second = seen[pick(0, len(seen))], seen[pick(1, len(seen))]
    if split == "novel":  # one object (either) is a held-out pair, the other a seen one
        novel = np.array(NOVEL_OBJECTS, dtype=np.int64)[pick(2, len(NOVEL_OBJECTS))]
        novel_first = pick(3, 2) == 0
        first = np.where(novel_first[:, None], novel, first)
        second = np.where(novel_first[:, None], second, novel)
    across = ACROSS_LOW + (ACROSS_HIGH - ACROSS_LOW) * uniform(6)
    table = {
        "first_colour": first[:, 0],
        "first_shape": first[:, 1],
        "relation": pick(4, len(RELATIONS)),
        "second_colour": second[:, 0],
        "second_shape": second[:, 1],
        "background": pick(5, len(BACKGROUNDS)),
        "along_first": NEAR + SPAN * uniform(7),
        "along_second": FAR + SPAN * uniform(8),
        "across_first": across,
        "across_second": np.clip(
            across + ACROSS_GAP * (2 * uniform(9) - 1), ACROSS_LOW, ACROSS_HIGH
        ),
        "radius_first": RADIUS_LOW + RADIUS_SPAN * uniform(10),
        "radius_second": RADIUS_LOW + RADIUS_SPAN * uniform(11),
        "template": pick(12, len(CAPTION_TEMPLATES)),
        "noise": pick(13, NUM_NOISE_PATTERNS),
        "mention": np.where(
            (uniform(14) < partial_captions) & (idx >= partial_from),
            1 + pick(15, FULL_MENTION),
            FULL_MENTION,
        ),
    }
    return table


def _edit_groups(
    table: dict[str, np.ndarray],
    seed: int,
    split: str,
    idx: np.ndarray,
    share: float,
    edits: Sequence[str],
) -> None:
    """Turn a share of the aligned runs of ``2**k`` samples into groups over the ``k`` edits:
    member ``m`` of the group that starts at sample ``b`` shows ``b``'s scene with edit ``i``
    applied (in list order) wherever bit ``i`` of ``m`` is set, so every member has, for each
    edit, a sibling in its batch that differs by about that edit alone (a shape edit after a
    binding edit picks among the shapes the new colour allows). Random in-batch negatives
    rarely share both colours and the relation, so without these the contrastive loss is
    met by colours and layout alone and never learns shapes or which colour is whose."""
    check_groups(share, split, edits, HARD_NEGATIVE_EDITS)
    size = 1 << len(edits)
    member = idx % size
    first = idx - member
    w = random_words(split_seed(seed, split) + _EDIT_STREAM, first, 2)
    rows = np.nonzero((member != 0) & (unit_float(w[:, 0]) < share))[0]
    original = _independent_table(seed, split, first[rows])
    keep = ("template", "noise", "mention")  # each member keeps its own caption draws
    for name, values in original.items():
        if name not in keep:
            table[name][rows] = values
    for i, edit in enumerate(edits):
        on = rows[(member[rows] >> i) & 1 == 1]
        _EDITS[edit](table, on, w[on, 1])


def _swap_binding(table: dict[str, np.ndarray], rows: np.ndarray, bits: np.ndarray) -> None:
    """Each shape takes the other's colour; where that gives the same scene or a held-out
    object, the first object takes another colour that keeps it a seen object."""
    c1, s1 = table["first_colour"][rows], table["first_shape"][rows]
    c2, s2 = table["second_colour"][rows], table["second_shape"][rows]
    swap = (c1 != c2) & _SEEN[c2, s1] & _SEEN[c1, s2]
    allowed = _SEEN[:, s1].T.copy()
    allowed[np.arange(len(rows)), c1] = False
    recolour = nth_true(allowed, (bits >> np.uint64(11)).astype(np.int64))
    table["first_colour"][rows] = np.where(swap, c2, recolour)
    table["second_colour"][rows] = np.where(swap, c1, c2)


def _change_shape(table: dict[str, np.ndarray], rows: np.ndarray, bits: np.ndarray) -> None:
    """One object (either, by the draw) takes another shape that keeps it a seen object."""
    which = np.where((bits >> np.uint64(7)) & np.uint64(1) == 1, "second", "first")
    for name in ("first", "second"):
        on = rows[which == name]
        colour, shape = table[f"{name}_colour"][on], table[f"{name}_shape"][on]
        allowed = _SEEN[colour].copy()
        allowed[np.arange(len(on)), shape] = False
        draws = (bits[which == name] >> np.uint64(11)).astype(np.int64)
        table[f"{name}_shape"][on] = nth_true(allowed, draws)


def _flip_relation(table: dict[str, np.ndarray], rows: np.ndarray, bits: np.ndarray) -> None:
    """ "left of" <-> "above": the same layout turned about the diagonal."""
    table["relation"][rows] = 1 - table["relation"][rows]


_EDITS = {"binding": _swap_binding, "shape": _change_shape, "relation": _flip_relation}


def row_scene(table: dict[str, np.ndarray], row: int) -> Scene:
    """The ``Scene`` of one row of a ``sample_table``."""

    def get(name: str) -> float:
        return float(table[name][row])

    along = (get("along_first"), get("along_second"))
    across = (get("across_first"), get("across_second"))
    horizontal = int(table["relation"][row]) == RELATIONS.index("left of")
    centres = tuple(zip(along, across) if horizontal else zip(across, along))
    return Scene(
        first_colour=int(table["first_colour"][row]),
        first_shape=int(table["first_shape"][row]),
        relation=int(table["relation"][row]),
        second_colour=int(table["second_colour"][row]),
        second_shape=int(table["second_shape"][row]),
        background=int(table["background"][row]),
        centres=centres,
        radii=(get("radius_first"), get("radius_second")),
        template=int(table["template"][row]),
        noise=int(table["noise"][row]),
        mention=int(table["mention"][row]),
    )
