"""Sampling: every random choice of a sample is a pure function of ``(seed, split, index)``,
from a counter-based hash (SplitMix64) instead of a stateful RNG, and whole tables of samples
are drawn at once (vectorised); hard negatives turn runs of train samples into factorial
groups."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from limoe.data.shapes.attributes import (
    ATTRIBUTE_VALUES,
    BACKGROUNDS,
    COLOURS,
    NOVEL_PAIRS,
    NUM_NOISE_PATTERNS,
    POSITIONS,
    SEEN_PAIRS,
    SHAPES,
    SIZES,
    Attributes,
)
from limoe.data.shapes.captions import CAPTION_TEMPLATES, FULL_MENTION

# Split ids are folded into the seed (seed * len(SPLITS) + id), so two splits never share a
# stream, whatever the base seed.
SPLITS: tuple[str, ...] = ("train", "val", "test", "novel")


def split_seed(seed: int, split: str) -> int:
    """The stream seed of one split: distinct for every (seed, split) with seed >= 0."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed * len(SPLITS) + SPLITS.index(split)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a cheap, well-mixed hash of uint64 counters."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def random_words(stream: int, indices: np.ndarray, num_words: int) -> np.ndarray:
    """uint64 [N, num_words] of hash-random bits, a pure function of (stream, index, word)."""
    key = _splitmix64(np.array([stream], dtype=np.uint64))
    base = _splitmix64(key ^ indices.astype(np.uint64))
    words = np.arange(1, num_words + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
    with np.errstate(over="ignore"):
        return _splitmix64(base[:, None] + words[None, :])


def unit_float(words: np.ndarray) -> np.ndarray:
    """Map uint64 bits to floats in [0, 1) using the top 53 bits."""
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def checked_indices(
    indices: Sequence[int] | np.ndarray, partial_captions: float, partial_from: int
) -> np.ndarray:
    """``indices`` as int64, after checking the arguments every ``sample_table`` takes."""
    if not 0.0 <= partial_captions <= 1.0:
        raise ValueError(f"partial_captions must be in [0, 1], got {partial_captions}")
    if partial_from < 0:
        raise ValueError(f"partial_from must be >= 0, got {partial_from}")
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.min() < 0:
        raise ValueError("sample indices must be >= 0")
    return idx


def check_groups(share: float, split: str, names: Sequence[str], allowed: Sequence[str]) -> None:
    """The hard-negative arguments: a share in [0, 1], the train split, distinct known names."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"hard_negatives must be in [0, 1], got {share}")
    if split != "train":
        raise ValueError(f"hard negatives are a training recipe; got split {split!r}")
    if not names or any(n not in allowed for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"hard_negative_attributes must be distinct names from {tuple(allowed)}, "
            f"got {list(names)}"
        )


def sample_table(
    seed: int,
    split: str,
    indices: Sequence[int] | np.ndarray,
    partial_captions: float = 0.0,
    partial_from: int = 0,
    hard_negatives: float = 0.0,
    hard_negative_attributes: Sequence[str] = ("shape", "position"),
) -> dict[str, np.ndarray]:
    """Attributes of many samples at once (vectorised), as arrays keyed by field name.

    A share ``partial_captions`` of the samples with index ``>= partial_from`` get a caption
    that names a random non-empty subset of the attributes (see ``partial_caption``); the
    others name all of them. Read in index order, the train split is then a curriculum: full
    captions first, which teach every attribute (position and shape are learned much later when
    short captions are mixed in from the start), then the mix that makes short zero-shot
    prompts work.

    A share ``hard_negatives`` of the runs of ``2**k`` samples become factorial groups over the
    ``k`` attributes in ``hard_negative_attributes`` (see ``_factorial_groups``).
    """
    idx = checked_indices(indices, partial_captions, partial_from)
    table = _independent_table(seed, split, idx, partial_captions, partial_from)
    if hard_negatives > 0:
        _factorial_groups(table, seed, split, idx, hard_negatives, hard_negative_attributes)
    return table


_SEEN = np.zeros((len(COLOURS), len(SHAPES)), dtype=bool)
_SEEN[tuple(np.array(SEEN_PAIRS).T)] = True  # _SEEN[colour, shape]: the pair may be drawn


def nth_true(mask: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per row of ``mask`` [N, n], the index of its ``(r mod count)``-th True value."""
    k = r % mask.sum(axis=1)
    return np.argmax(np.cumsum(mask, axis=1) > k[:, None], axis=1)


def _edited_values(original: dict[str, np.ndarray], draws: dict[str, np.ndarray]) -> dict:
    """Per group, one other value for each attribute in ``draws``.

    Colour and shape are picked so that every mix of original and edited values is a seen
    pair: colour first (one that fits the original shape), then a shape that fits both
    colours. The other attributes combine freely.
    """
    rows = np.arange(len(original["colour"]))
    colour, shape = original["colour"], original["shape"]
    edited = {}
    if "colour" in draws:
        allowed = _SEEN[:, shape].T.copy()
        allowed[rows, colour] = False
        edited["colour"] = nth_true(allowed, draws["colour"])
    if "shape" in draws:
        allowed = _SEEN[colour] & _SEEN[edited.get("colour", colour)]
        allowed[rows, shape] = False
        edited["shape"] = nth_true(allowed, draws["shape"])
    for name in draws.keys() - {"colour", "shape"}:
        n = len(ATTRIBUTE_VALUES[name])
        edited[name] = (original[name] + 1 + draws[name] % (n - 1)) % n
    return edited


def _factorial_groups(
    table: dict[str, np.ndarray],
    seed: int,
    split: str,
    idx: np.ndarray,
    share: float,
    attributes: Sequence[str],
) -> None:
    """Turn a share of the aligned runs of ``2**k`` samples into factorial groups over the
    ``k`` listed attributes.

    Member ``m`` of the group that starts at sample ``b`` shows the objects of ``b`` with
    attribute ``i`` set to one other value wherever bit ``i`` of ``m`` is set. Every member
    then has, for each listed attribute, a sibling that differs in that attribute alone, and
    the train loader reads samples in order, so the siblings share a batch: captions that
    differ in one word ("circle"/"ring", "top"/"top left"). Random in-batch negatives rarely
    differ in shape or position alone, which leaves the contrastive loss little reason to
    learn them. Each sample keeps its own caption template, jitter, noise and mention draws.
    """
    check_groups(share, split, attributes, tuple(ATTRIBUTE_VALUES))
    size = 1 << len(attributes)
    member = idx % size
    first = idx - member
    w = random_words(split_seed(seed, split) + _EDIT_STREAM, first, 1 + len(attributes))
    rows = np.nonzero((member != 0) & (unit_float(w[:, 0]) < share))[0]
    original = _independent_table(seed, split, first[rows])
    bits = (w[rows, 1:] >> np.uint64(11)).astype(np.int64)
    draws = {name: bits[:, i] for i, name in enumerate(attributes)}
    edited = _edited_values(original, draws)
    for name in ATTRIBUTE_VALUES:
        table[name][rows] = original[name]
    for i, name in enumerate(attributes):
        on = (member[rows] >> i) & 1 == 1
        table[name][rows[on]] = edited[name][on]


_EDIT_STREAM = 0x5EED  # offsets the edit draws from the sample draws of the same split


def _independent_table(
    seed: int, split: str, idx: np.ndarray, partial_captions: float = 0.0, partial_from: int = 0
) -> dict[str, np.ndarray]:
    """Every sample drawn on its own from its (seed, split, index) hash."""
    pairs = np.array(NOVEL_PAIRS if split == "novel" else SEEN_PAIRS, dtype=np.int64)
    w = random_words(split_seed(seed, split), idx, 10)
    pair = pairs[(w[:, 0] % np.uint64(len(pairs))).astype(np.int64)]

    def pick(col: int, n: int) -> np.ndarray:
        return (w[:, col] % np.uint64(n)).astype(np.int64)

    return {
        "colour": pair[:, 0],
        "shape": pair[:, 1],
        "size": pick(1, len(SIZES)),
        "position": pick(2, len(POSITIONS)),
        "background": pick(3, len(BACKGROUNDS)),
        "template": pick(4, len(CAPTION_TEMPLATES)),
        "jitter_x": 2.0 * unit_float(w[:, 5]) - 1.0,
        "jitter_y": 2.0 * unit_float(w[:, 6]) - 1.0,
        "noise": pick(7, NUM_NOISE_PATTERNS),
        "mention": np.where(
            (unit_float(w[:, 8]) < partial_captions) & (idx >= partial_from),
            1 + pick(9, FULL_MENTION),
            FULL_MENTION,
        ),
    }


def row_attributes(table: dict[str, np.ndarray], row: int) -> Attributes:
    """The ``Attributes`` of one row of a ``sample_table``."""
    return Attributes(
        colour=int(table["colour"][row]),
        shape=int(table["shape"][row]),
        size=int(table["size"][row]),
        position=int(table["position"][row]),
        background=int(table["background"][row]),
        template=int(table["template"][row]),
        jitter=(float(table["jitter_x"][row]), float(table["jitter_y"][row])),
        noise=int(table["noise"][row]),
        mention=int(table["mention"][row]),
    )


def sample_attributes(seed: int, index: int, split: str = "train") -> Attributes:
    """The attributes of sample ``index`` of ``split``; deterministic from (seed, split, index).

    The split decides the allowed (colour, shape) pairs: ``novel`` draws only NOVEL_PAIRS,
    every other split only SEEN_PAIRS.
    """
    return row_attributes(sample_table(seed, split, [index]), 0)
