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
def background_bank(image_size: int) -> np.ndarray:
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
    radius = SIZE_RADIUS[attrs.size] * image_size
    return draw_mask(SHAPES[attrs.shape], attrs.centre(image_size), radius, image_size)


def draw_mask(name: str, centre: tuple[float, float], radius: float, image_size: int) -> np.ndarray:
    """bool [H, W]: the pixels a shape called ``name`` of ``radius`` pixels covers at
    ``centre`` (x, y); the shape vocabulary of every embedded dataset."""
    xx, yy = _pixel_grid(image_size)
    dx, dy = xx - centre[0], yy - centre[1]
    r = radius
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
    if name == "pentagon":  # regular, one corner up: inside all five edges
        normals = -np.pi / 2 + np.pi / 5 + 2 * np.pi * np.arange(5) / 5
        reach = np.stack([dx * np.cos(a) + dy * np.sin(a) for a in normals]).max(axis=0)
        return reach <= r * np.cos(np.pi / 5)
    if name == "star":  # five points, one up
        angle = np.arctan2(dy, dx) + np.pi / 2
        edge = r * (0.62 + 0.38 * np.cos(5 * angle))
        return np.hypot(dx, dy) <= edge
    if name == "dome":  # a half disc, flat side down, centred on its bounding box
        ly = dy - 0.35 * r
        return (dx * dx + ly * ly <= r * r) & (ly <= 0)
    if name == "bar":  # a rectangle lying flat
        return (np.abs(dx) <= r) & (np.abs(dy) <= 0.45 * r)
    raise ValueError(f"unknown shape {name!r}")


def render(attrs: Attributes, image_size: int = 32) -> np.ndarray:
    """uint8 [H, W, 3]: the image of one sample; a pure function of its attributes."""
    image = background_bank(image_size)[attrs.background, attrs.noise].copy()
    image[shape_mask(attrs, image_size)] = COLOUR_RGB[COLOURS[attrs.colour]]
    return image
