"""Rendering: the image of a sample, a pure function of its ``Attributes``."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from limoe.data.shapes.attributes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    NUM_NOISE_PATTERNS,
    SHAPES,
    SIZE_RADIUS,
    Attributes,
)

NOISE_AMPLITUDE = 6  # +- per-pixel brightness noise on the background, in 0..255 units


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
