"""The vocabulary of the scenes data, the (colour, shape) objects of each split, ``Scene``
(what one sample shows) and its captions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from open_clip.tokenizer import SimpleTokenizer

from limoe.data.shapes import attributes as shapes

BACKGROUNDS = shapes.BACKGROUNDS
# The shapes colours, every name one token ("cyan" is two, so it is "aqua" here), so that
# the longest caption fits 14 tokens.
COLOURS: tuple[str, ...] = tuple("aqua" if c == "cyan" else c for c in shapes.COLOURS)
COLOUR_RGB: dict[str, tuple[int, int, int]] = dict(zip(COLOURS, shapes.COLOUR_RGB.values()))
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "diamond",
    "ring", "pentagon", "star", "dome", "bar",
)  # fmt: skip
# The first object named is left of (or above) the second: each image has one description.
RELATIONS: tuple[str, ...] = ("left of", "above")

# (colour, shape) objects that never occur in train/val/test: one per colour, no shape twice.
# Every image of the novel split shows one of them beside a seen object.
NOVEL_OBJECT_NAMES: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "square"),
    ("blue", "circle"),
    ("yellow", "ring"),
    ("magenta", "diamond"),
    ("aqua", "cross"),
    ("orange", "pentagon"),
    ("white", "star"),
)
NOVEL_OBJECTS: tuple[tuple[int, int], ...] = tuple(
    (COLOURS.index(c), SHAPES.index(s)) for c, s in NOVEL_OBJECT_NAMES
)
SEEN_OBJECTS: tuple[tuple[int, int], ...] = tuple(
    (c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES)) if (c, s) not in NOVEL_OBJECTS
)

# The caption's five slots, in the order a caption names them; a slot's values.
SLOTS: tuple[str, ...] = (
    "first_colour",
    "first_shape",
    "relation",
    "second_colour",
    "second_shape",
)
SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "first_colour": COLOURS,
    "first_shape": SHAPES,
    "relation": RELATIONS,
    "second_colour": COLOURS,
    "second_shape": SHAPES,
}
FULL_MENTION = (1 << len(SLOTS)) - 1

CAPTION_TEMPLATES: tuple[str, ...] = (
    "the {first} {relation} the {second}",
    "a photo of the {first} {relation} the {second}.",
    "an image showing the {first} {relation} the {second}.",
    "the {first} is {relation} the {second}.",
)
# Partial captions name only some slots: an unnamed shape is "shape", an unnamed colour is
# left out, an unnamed relation is "and" (the first named is still the left or upper one).
PARTIAL_TEMPLATES: tuple[str, ...] = (
    "the {first} {relation} the {second}",
    "a photo of the {first} {relation} the {second}.",
)


def caption_from(names: dict[str, str], mention: int = FULL_MENTION, template: int = 0) -> str:
    """The caption that names the slots whose bit is set in ``mention`` (all by default)."""
    said = {slot: names[slot] for bit, slot in enumerate(SLOTS) if mention >> bit & 1}

    def noun(which: str) -> str:
        colour = said.get(f"{which}_colour")
        shape = said.get(f"{which}_shape", "shape")
        return f"{colour} {shape}" if colour else shape

    fill = {
        "first": noun("first"),
        "relation": said.get("relation", "and"),
        "second": noun("second"),
    }
    templates = CAPTION_TEMPLATES if mention == FULL_MENTION else PARTIAL_TEMPLATES
    return templates[template % len(templates)].format(**fill)


@dataclass(frozen=True)
class Scene:
    """What one sample shows: two objects in a relation, as indices into the vocabulary, plus
    the nuisance draws (where exactly, how large, which background and noise pattern)."""

    first_colour: int
    first_shape: int
    relation: int
    second_colour: int
    second_shape: int
    background: int = 0
    centres: tuple[tuple[float, float], tuple[float, float]] = ((0.25, 0.5), (0.75, 0.5))
    radii: tuple[float, float] = (0.1, 0.1)  # as fractions of the image side
    template: int = 0
    noise: int = 0
    mention: int = FULL_MENTION

    @property
    def names(self) -> dict[str, str]:
        return {slot: SLOT_VALUES[slot][getattr(self, slot)] for slot in SLOTS}

    def caption(self) -> str:
        return caption_from(self.names, self.mention, self.template)


def scene_roles(scene: Scene, token_ids: Sequence[int], tokenizer: SimpleTokenizer) -> list[str]:
    """The role of each token of a tokenised caption of ``scene``: ``colour``, ``shape`` or
    ``relation`` for the words that name a slot's value, ``start/end``, ``other`` (template
    words, "shape" and "and" standing for an unnamed slot, padding). Slots are found in caption
    order, each after the previous, as token runs ("cyan" is two tokens)."""
    ids = [int(t) for t in token_ids]
    roles = ["other"] * len(ids)
    for i, token in enumerate(ids):
        if token in (tokenizer.sot_token_id, tokenizer.eot_token_id):
            roles[i] = "start/end"
    cursor = 0
    names = scene.names
    for bit, slot in enumerate(SLOTS):
        if not scene.mention >> bit & 1:
            continue
        run = tokenizer.encode(names[slot])
        for i in range(cursor, len(ids) - len(run) + 1):
            if ids[i : i + len(run)] == run:
                for j in range(i, i + len(run)):
                    roles[j] = slot.split("_")[-1]
                cursor = i + len(run)
                break
    return roles
