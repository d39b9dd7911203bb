"""The zero-shot tasks of the scenes data: one per caption slot, prompted in the
partial-caption language ("the red shape and the shape.")."""

from __future__ import annotations

from limoe.data.scenes.scene import PARTIAL_TEMPLATES, SLOT_VALUES, SLOTS, caption_from
from limoe.eval.plan import ZeroShotTask

# Order of the label vector of ScenesDataset(return_labels=True).
TASK_NAMES: tuple[str, ...] = SLOTS


def slot_prompts(slot: str) -> list[str]:
    """Zero-shot templates that name only ``slot`` (its class as ``{}``)."""
    names = {s: "{}" if s == slot else "" for s in SLOTS}
    mention = 1 << SLOTS.index(slot)
    return [caption_from(names, mention, t) for t in range(len(PARTIAL_TEMPLATES))]


def zeroshot_tasks() -> dict[str, ZeroShotTask]:
    """The zero-shot tasks, in label order; a fresh dict so callers may edit it freely."""
    return {slot: ZeroShotTask(slot, list(SLOT_VALUES[slot]), slot_prompts(slot)) for slot in SLOTS}
