"""Zero-shot classification tasks from ImageFolder trees (``root/<class name>/<image>``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torchvision.datasets.folder import find_classes, make_dataset

from limoe.data.images import IMAGE_EXTENSIONS, keep_readable
from limoe.data.pairs import IndexedSamples, PairDataset
from limoe.data.skips import SkipCounts
from limoe.eval.plan import EvalSet, ZeroShotTask

# A short, generic subset of CLIP's ImageNet prompts: class-agnostic, usable for any folder.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
    "itap of a {}.",
)


def classname(folder: str) -> str:
    """``golden_retriever`` and ``golden-retriever`` read as ``golden retriever``."""
    return " ".join(folder.replace("_", " ").replace("-", " ").split())


def check_templates(templates: Sequence[str] | None, key: str) -> list[str]:
    """The prompt templates (None: ``DEFAULT_TEMPLATES``), each with one ``{}`` for the class
    name; ``key`` names them in the error."""
    templates = list(templates or DEFAULT_TEMPLATES)
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{key}: {bad[0]!r} must hold one '{{}}'")
    return templates


def imagefolder_task(
    name: str,
    root: str | Path,
    templates: Sequence[str] | None = None,
    counts: SkipCounts | None = None,
    check_images: bool = True,
    key: str | None = None,
) -> tuple[ZeroShotTask, list[tuple[str, None]], list[int]]:
    """The task (class names from the folders, in torchvision's sorted order), its images and
    their labels. Files without an image extension are ignored, as torchvision's ImageFolder
    does; image files PIL cannot identify are counted in ``counts`` and left out. ``key``
    names the config node in messages (default ``data.zeroshot.NAME``)."""
    root = Path(root)
    key = key or f"data.zeroshot.{name}"
    if not root.is_dir():
        raise ValueError(f"{key}.root={root} is not a directory")
    templates = check_templates(templates, f"{key}.templates")
    folders, class_to_idx = find_classes(str(root))
    extensions = tuple("." + e for e in IMAGE_EXTENSIONS)
    samples = make_dataset(str(root), class_to_idx, extensions=extensions, allow_empty=True)
    if not samples:
        raise ValueError(f"{key}.root={root} holds no {'/'.join(extensions)} images")
    counts = counts if counts is not None else SkipCounts(str(root))
    items = [(path, None) for path, _ in samples]
    kept = keep_readable(items, counts, need_caption=False, check_images=check_images)
    label_of = dict(samples)
    task = ZeroShotTask(name, [classname(f) for f in folders], templates)
    return task, kept, [label_of[path] for path, _ in kept]


def imagefolder_eval_set(
    name: str,
    spec: Mapping,
    transform: Callable,
    image_size: int,
    background: Sequence[int],
    counts: SkipCounts,
    check_images: bool = True,
    max_skipped_fraction: float = 0.5,
    key: str | None = None,
) -> EvalSet:
    """The test loader's samples of the zero-shot task ``data.zeroshot.NAME`` (``spec``:
    ``root`` and optional ``templates``); stops when too few of its images are readable."""
    task, items, labels = imagefolder_task(
        name, spec["root"], spec.get("templates"), counts, check_images, key
    )
    counts.check(max_skipped_fraction)
    dataset = PairDataset(
        items, transform, image_size, labels=labels, background=background, counts=counts
    )
    return EvalSet("test", IndexedSamples(dataset), (task,))
