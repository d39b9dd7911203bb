"""The zero-shot tasks of the shapes data: one per attribute, prompted in the partial-caption
language."""

from __future__ import annotations

from limoe.data.shapes.attributes import ATTRIBUTE_VALUES
from limoe.data.shapes.captions import MENTION_ORDER, PARTIAL_TEMPLATES, partial_caption
from limoe.eval.plan import ZeroShotTask


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
