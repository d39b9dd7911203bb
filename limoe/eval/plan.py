"""What an evaluation runs: zero-shot classification tasks, shared by every dataset."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ZeroShotTask:
    """An open_clip-style zero-shot task: class names plus prompt templates with one ``{}``."""

    name: str
    classnames: list[str]
    templates: list[str]

    def prompts(self, classname: str) -> list[str]:
        return [t.format(classname) for t in self.templates]
