"""Rendering: the image of a scene, a pure function of its ``Scene``."""

from __future__ import annotations

import numpy as np

from limoe.data.scenes.scene import COLOUR_RGB, COLOURS, SHAPES, Scene
from limoe.data.shapes.render import background_bank, draw_mask

__all__ = ["object_masks", "render"]


def object_masks(scene: Scene, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """bool [H, W] each: the pixels of the first and of the second object."""
    shapes = (scene.first_shape, scene.second_shape)
    return tuple(
        draw_mask(SHAPES[shape], (x * image_size, y * image_size), r * image_size, image_size)
        for shape, (x, y), r in zip(shapes, scene.centres, scene.radii)
    )


def render(scene: Scene, image_size: int = 56) -> np.ndarray:
    """uint8 [H, W, 3]: the image of one scene."""
    image = background_bank(image_size)[scene.background, scene.noise].copy()
    colours = (scene.first_colour, scene.second_colour)
    for mask, colour in zip(object_masks(scene, image_size), colours):
        image[mask] = COLOUR_RGB[COLOURS[colour]]
    return image
