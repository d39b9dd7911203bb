"""``ScenesDataset``: two objects in a relation per image, captions that bind each colour to
its shape."""

from __future__ import annotations

import numpy as np

from limoe.data.defaults import with_defaults
from limoe.data.procedural import ProceduralPairs
from limoe.data.scenes.render import object_masks, render
from limoe.data.scenes.sampling import row_scene, sample_table
from limoe.data.scenes.scene import Scene, scene_roles
from limoe.data.scenes.tasks import TASK_NAMES


class ScenesDataset(ProceduralPairs):
    """``size`` samples of one split: ``(image [3,H,W] in [-1,1], tokens [L])`` (+ labels,
    one per caption slot in ``TASK_NAMES`` order)."""

    task_names = TASK_NAMES
    sample_table = staticmethod(sample_table)

    __init__ = with_defaults(
        ProceduralPairs.__init__,
        image_size=56,
        context_length=16,
        hard_negative_attributes=("binding", "shape"),
    )

    def row(self, i: int) -> Scene:
        return row_scene(self._table, i)

    def draw(self, row: Scene) -> np.ndarray:
        return render(row, self.image_size)

    def scene(self, i: int) -> Scene:
        return self.row(self._check_index(i))

    def object_mask(self, i: int) -> np.ndarray:
        """bool [H, W]: the pixels either object covers (for the routing analysis)."""
        first, second = object_masks(self.scene(i), self.image_size)
        return first | second

    def caption_roles(self, i: int) -> list[str]:
        """The role of each token of sample ``i``'s tokenised caption (``scene_roles``)."""
        scene = self.scene(i)
        return scene_roles(scene, self.tokens(scene.caption()), self.tokenizer)
