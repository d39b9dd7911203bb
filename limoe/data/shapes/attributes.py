"""The attribute vocabulary of the shapes data, the (colour, shape) pairs of each split, and
``Attributes``: what one sample shows."""

from __future__ import annotations

from dataclasses import dataclass

from limoe.data.shapes.captions import CAPTION_TEMPLATES, FULL_MENTION, partial_caption

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

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}

# Geometry as fractions of the image side: the radius per size, the jitter around the cell
# centre (kept small so the shape stays inside its named cell).
SIZE_RADIUS: tuple[float, ...] = (0.145, 0.22)
JITTER = 0.06
EDGE_MARGIN = 1.15  # shape centres stay this many radii from the border
NUM_NOISE_PATTERNS = 16  # background noise patterns to pick from (Attributes.noise)


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
