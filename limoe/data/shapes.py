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
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch.utils.data import Dataset

from limoe.eval.plan import ZeroShotTask

# --------------------------------------------------------------------------- attributes

COLOURS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white",
)  # fmt: skip
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 200, 40),
    "blue": (40, 90, 255),
    "yellow": (250, 230, 30),
    "magenta": (230, 40, 230),
    "cyan": (40, 230, 230),
    "orange": (255, 140, 0),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
BACKGROUNDS: tuple[str, ...] = ("black", "grey", "navy", "brown")
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "grey": (85, 85, 85),
    "navy": (15, 25, 95),
    "brown": (95, 55, 20),
}

# (colour, shape) pairs that never occur in train/val/test: exactly one per colour, every
# shape at least once, so the novel split asks for new combinations of familiar parts.
NOVEL_PAIR_NAMES: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "square"),
    ("blue", "circle"),
    ("yellow", "ring"),
    ("magenta", "diamond"),
    ("cyan", "cross"),
    ("orange", "square"),
    ("white", "triangle"),
)
NOVEL_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (COLOURS.index(c), SHAPES.index(s)) for c, s in NOVEL_PAIR_NAMES
)
SEEN_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES)) if (c, s) not in NOVEL_PAIRS
)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} in the {position} on a {background} background",
    "a photo of a {size} {colour} {shape} at the {position}, {background} background.",
    "there is a {size} {colour} {shape} in the {position} over a {background} background.",
    "{background} background with a {size} {colour} {shape} in the {position}",
    "the {colour} {shape} is {size} and sits in the {position} of a {background} image.",
    "an image of a {size} {colour} {shape} located at the {position} on {background}.",
)

# Partial captions name only some attributes ("a red shape in the top left"). Training on a
# share of them teaches the text tower that a short description matches every image it fits,
# which is what zero-shot prompts ("a {} shape.") ask of it.
MENTION_ORDER: tuple[str, ...] = ("size", "colour", "shape", "position", "background")
FULL_MENTION = (1 << len(MENTION_ORDER)) - 1
PARTIAL_TEMPLATES: tuple[str, ...] = ("a {noun}{where}{on}", "a photo of a {noun}{where}{on}.")


def partial_caption(names: dict[str, str], mention: int, template: int = 0) -> str:
    """A caption naming only the attributes whose bit is set in ``mention``."""
    said = {a: names[a] for i, a in enumerate(MENTION_ORDER) if mention >> i & 1}
    noun = [said[a] for a in ("size", "colour") if a in said] + [said.get("shape", "shape")]
    where = f" in the {said['position']}" if "position" in said else ""
    on = f" on a {said['background']} background" if "background" in said else ""
    fill = {"noun": " ".join(noun), "where": where, "on": on}
    return PARTIAL_TEMPLATES[template % len(PARTIAL_TEMPLATES)].format(**fill)


# Split ids are folded into the seed (seed * len(SPLITS) + id), so two splits never share a
# stream, whatever the base seed.
SPLITS: tuple[str, ...] = ("train", "val", "test", "novel")

# Geometry as fractions of the image side: the radius per size, the jitter around the cell
# centre (kept small so the shape stays inside its named cell).
SIZE_RADIUS: tuple[float, ...] = (0.145, 0.22)
JITTER = 0.06
EDGE_MARGIN = 1.15  # shape centres stay this many radii from the border
NOISE_AMPLITUDE = 6  # +- per-pixel brightness noise on the background, in 0..255 units
NUM_NOISE_PATTERNS = 16

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Attributes:
    """What one sample shows, as indices into the attribute tuples, plus its nuisance draws."""

    colour: int
    shape: int
    size: int
    position: int
    background: int
    template: int = 0
    jitter: tuple[float, float] = (0.0, 0.0)  # (x, y) in [-1, 1], scaled by JITTER
    noise: int = 0  # which background noise pattern
    mention: int = FULL_MENTION  # bit i set: the caption names MENTION_ORDER[i]

    @property
    def names(self) -> dict[str, str]:
        return {
            "colour": COLOURS[self.colour],
            "shape": SHAPES[self.shape],
            "size": SIZES[self.size],
            "position": POSITIONS[self.position],
            "background": BACKGROUNDS[self.background],
        }

    def caption(self) -> str:
        if self.mention == FULL_MENTION:
            return CAPTION_TEMPLATES[self.template].format(**self.names)
        return partial_caption(self.names, self.mention, self.template)

    def centre(self, image_size: int = 32) -> tuple[float, float]:
        """Pixel coordinates (x, y) of the shape's centre.

        The cell centre plus jitter, pulled in from the border far enough that the shape is
        not cut off by the image edge (a clipped shape loses what makes it a triangle).
        """
        row, col = divmod(self.position, 3)
        cell = image_size / 3
        x = (col + 0.5) * cell + self.jitter[0] * JITTER * image_size
        y = (row + 0.5) * cell + self.jitter[1] * JITTER * image_size
        margin = EDGE_MARGIN * SIZE_RADIUS[self.size] * image_size
        return min(max(x, margin), image_size - margin), min(max(y, margin), image_size - margin)


# --------------------------------------------------------------------------- sampling


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


def _random_words(stream: int, indices: np.ndarray, num_words: int) -> np.ndarray:
    """uint64 [N, num_words] of hash-random bits, a pure function of (stream, index, word)."""
    key = _splitmix64(np.array([stream], dtype=np.uint64))
    base = _splitmix64(key ^ indices.astype(np.uint64))
    words = np.arange(1, num_words + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
    with np.errstate(over="ignore"):
        return _splitmix64(base[:, None] + words[None, :])


def _unit_float(words: np.ndarray) -> np.ndarray:
    """Map uint64 bits to floats in [0, 1) using the top 53 bits."""
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


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
    if not 0.0 <= partial_captions <= 1.0:
        raise ValueError(f"partial_captions must be in [0, 1], got {partial_captions}")
    if partial_from < 0:
        raise ValueError(f"partial_from must be >= 0, got {partial_from}")
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.min() < 0:
        raise ValueError("sample indices must be >= 0")
    table = _independent_table(seed, split, idx, partial_captions, partial_from)
    if hard_negatives > 0:
        _factorial_groups(table, seed, split, idx, hard_negatives, hard_negative_attributes)
    return table


_SEEN = np.zeros((len(COLOURS), len(SHAPES)), dtype=bool)
_SEEN[tuple(np.array(SEEN_PAIRS).T)] = True  # _SEEN[colour, shape]: the pair may be drawn


def _nth_true(mask: np.ndarray, r: np.ndarray) -> np.ndarray:
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
        edited["colour"] = _nth_true(allowed, draws["colour"])
    if "shape" in draws:
        allowed = _SEEN[colour] & _SEEN[edited.get("colour", colour)]
        allowed[rows, shape] = False
        edited["shape"] = _nth_true(allowed, draws["shape"])
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
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"hard_negatives must be in [0, 1], got {share}")
    if split != "train":
        raise ValueError(f"hard negatives are a training recipe; got split {split!r}")
    if (
        not attributes
        or any(a not in ATTRIBUTE_VALUES for a in attributes)
        or len(set(attributes)) != len(attributes)
    ):
        raise ValueError(
            "hard_negative_attributes must be distinct names from "
            f"{tuple(ATTRIBUTE_VALUES)}, got {list(attributes)}"
        )
    size = 1 << len(attributes)
    member = idx % size
    first = idx - member
    w = _random_words(split_seed(seed, split) + _EDIT_STREAM, first, 1 + len(attributes))
    rows = np.nonzero((member != 0) & (_unit_float(w[:, 0]) < share))[0]
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
    w = _random_words(split_seed(seed, split), idx, 10)
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
        "jitter_x": 2.0 * _unit_float(w[:, 5]) - 1.0,
        "jitter_y": 2.0 * _unit_float(w[:, 6]) - 1.0,
        "noise": pick(7, NUM_NOISE_PATTERNS),
        "mention": np.where(
            (_unit_float(w[:, 8]) < partial_captions) & (idx >= partial_from),
            1 + pick(9, FULL_MENTION),
            FULL_MENTION,
        ),
    }


def _row_to_attributes(table: dict[str, np.ndarray], row: int) -> Attributes:
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
    return _row_to_attributes(sample_table(seed, split, [index]), 0)


# --------------------------------------------------------------------------- rendering


@lru_cache(maxsize=8)
def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each float32 [H, W]; cached because it never changes."""
    coords = np.arange(image_size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy.flags.writeable = False
    xx.flags.writeable = False
    return xx, yy


@lru_cache(maxsize=4)
def _background_bank(image_size: int) -> np.ndarray:
    """uint8 [backgrounds, patterns, H, W, 3]: every background with every noise pattern.

    Precomputed once per image size, so rendering copies a background instead of drawing
    per-pixel noise for each sample.
    """
    rng = np.random.default_rng(20220606)  # fixed: the bank is part of the dataset definition
    noise = rng.integers(
        -NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(NUM_NOISE_PATTERNS, image_size, image_size, 1)
    )
    rgb = np.array([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=np.int64)
    bank = rgb[:, None, None, None, :] + noise[None]
    bank = np.clip(bank, 0, 255).astype(np.uint8)
    bank.flags.writeable = False
    return bank


def shape_mask(attrs: Attributes, image_size: int = 32) -> np.ndarray:
    """bool [H, W]: the pixels the shape covers."""
    xx, yy = _pixel_grid(image_size)
    cx, cy = attrs.centre(image_size)
    dx, dy = xx - cx, yy - cy
    r = SIZE_RADIUS[attrs.size] * image_size
    name = SHAPES[attrs.shape]
    if name == "circle":
        return dx * dx + dy * dy <= r * r
    if name == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if name == "triangle":  # equilateral, pointing up, centroid at the centre
        big = 1.25 * r
        return (dy <= 0.5 * big) & (np.abs(dx) <= (dy + big) * (3**0.5 / 3))
    if name == "cross":
        adx, ady = np.abs(dx), np.abs(dy)
        arm = 0.3 * r
        return ((adx <= arm) & (ady <= r)) | ((ady <= arm) & (adx <= r))
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if name == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    raise ValueError(f"unknown shape {name!r}")


def render(attrs: Attributes, image_size: int = 32) -> np.ndarray:
    """uint8 [H, W, 3]: the image of one sample; a pure function of its attributes."""
    image = _background_bank(image_size)[attrs.background, attrs.noise].copy()
    image[shape_mask(attrs, image_size)] = COLOUR_RGB[COLOURS[attrs.colour]]
    return image


# --------------------------------------------------------------------------- zero-shot tasks


ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}


def attribute_prompts(attribute: str) -> list[str]:
    """Zero-shot templates in the partial-caption language: only the class is named."""
    mention = 1 << MENTION_ORDER.index(attribute)
    names = {attribute: "{}"}
    return [partial_caption(names, mention, t) for t in range(len(PARTIAL_TEMPLATES))]


_TASK_SPECS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = tuple(
    (name, values, tuple(attribute_prompts(name))) for name, values in ATTRIBUTE_VALUES.items()
)

# Order of the label vector returned by ShapesDataset(return_labels=True).
TASK_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _TASK_SPECS)


def zeroshot_tasks() -> dict[str, ZeroShotTask]:
    """The zero-shot tasks, in label order; a fresh dict so callers may edit it freely."""
    return {
        name: ZeroShotTask(name, list(classes), list(templates))
        for name, classes, templates in _TASK_SPECS
    }


def caption_roles(
    attrs: Attributes, token_ids: Sequence[int], tokenizer: SimpleTokenizer
) -> list[str]:
    """The role of each token of a tokenised caption of ``attrs``: the attribute whose value it
    spells (``"colour"``, ``"shape"``, ``"size"``, ``"position"``, ``"background"``),
    ``"start/end"`` for the start and end tokens, ``"other"`` for template words and padding.

    Values are found as token runs in the caption, not token by token: "cyan" is the two
    tokens "cy" + "an", and "an" alone is also a template word ("an image of ...").
    """
    ids = [int(t) for t in token_ids]
    roles = ["other"] * len(ids)
    for i, token in enumerate(ids):
        if token in (tokenizer.sot_token_id, tokenizer.eot_token_id):
            roles[i] = "start/end"
    names = attrs.names
    for bit, attribute in enumerate(MENTION_ORDER):
        if not attrs.mention >> bit & 1:
            continue
        run = tokenizer.encode(names[attribute])
        for i in range(len(ids) - len(run) + 1):
            span = range(i, i + len(run))
            if ids[i : i + len(run)] == run and all(roles[j] == "other" for j in span):
                for j in span:
                    roles[j] = attribute
                break
    return roles


# --------------------------------------------------------------------------- dataset


class ShapesDataset(Dataset):
    """``size`` samples of one split: ``(image [3,H,W] in [-1,1], tokens [L])`` (+ labels).

    All attributes are drawn up front (vectorised, a few ms for 200k samples); images are
    rendered on access and tokenised captions are cached per distinct caption string, since
    there are far fewer distinct captions than samples and the BPE tokenizer is the slow part.
    """

    def __init__(
        self,
        split: str,
        size: int,
        image_size: int = 32,
        seed: int = 0,
        tokenizer: SimpleTokenizer | None = None,
        context_length: int = 32,
        return_labels: bool = False,
        partial_captions: float = 0.0,
        partial_from: int = 0,
        hard_negatives: float = 0.0,
        hard_negative_attributes: Sequence[str] = ("shape", "position"),
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.split = split
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.return_labels = return_labels
        if tokenizer is None:  # a given tokenizer (shared by a datamodule) sets its own length
            tokenizer = SimpleTokenizer(context_length=context_length)
        self.tokenizer = tokenizer
        self._table = sample_table(
            seed, split, np.arange(size), partial_captions, partial_from,
            hard_negatives, hard_negative_attributes,
        )  # fmt: skip
        self._labels = torch.from_numpy(np.stack([self._table[t] for t in TASK_NAMES], axis=1))
        self._token_cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.size

    def _check_index(self, i: int) -> int:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.split} split of size {self.size}")
        return int(i)

    def attributes(self, i: int) -> Attributes:
        return _row_to_attributes(self._table, self._check_index(i))

    def caption(self, i: int) -> str:
        return self.attributes(i).caption()

    def image_uint8(self, i: int) -> np.ndarray:
        return render(self.attributes(i), self.image_size)

    def labels(self, i: int) -> torch.Tensor:
        """long [num_tasks]: attribute indices in TASK_NAMES order."""
        return self._labels[self._check_index(i)].clone()

    def tokens(self, caption: str) -> torch.Tensor:
        cached = self._token_cache.get(caption)
        if cached is None:
            cached = self.tokenizer([caption])[0]
            self._token_cache[caption] = cached
        return cached.clone()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        attrs = self.attributes(i)
        image = torch.from_numpy(render(attrs, self.image_size)).permute(2, 0, 1)
        image = image.float().div_(127.5).sub_(1.0)  # mean .5, std .5 in [0, 1] units
        tokens = self.tokens(attrs.caption())
        if self.return_labels:
            return image, tokens, self._labels[i].clone()
        return image, tokens


# --------------------------------------------------------------------------- export


def rendered_samples(
    split: str, size: int, image_size: int = 32, seed: int = 0
) -> Iterator[tuple[int, Attributes, np.ndarray]]:
    """``(index, attributes, image [H, W, 3] uint8)`` of the first ``size`` samples of a
    split, as the exporters write them (full captions, no curriculum)."""
    table = sample_table(seed, split, np.arange(size))
    for i in range(size):
        attrs = _row_to_attributes(table, i)
        yield i, attrs, render(attrs, image_size)


def export_csv(
    split: str, size: int, out_dir: str | Path, image_size: int = 32, seed: int = 0
) -> Path:
    """Write ``size`` samples as PNGs plus an open_clip CSV (tab separated: filepath, title).

    Image paths are relative to the CSV's folder, so the folder can be moved as a whole and
    read by open_clip's CsvDataset or limoe's csv datamodule.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{split}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for i, attrs, image in rendered_samples(split, size, image_size, seed):
            rel = f"{split}/{i:06d}.png"
            Image.fromarray(image).save(out_dir / rel)
            writer.writerow([rel, attrs.caption()])
    return csv_path
