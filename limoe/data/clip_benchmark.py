"""Data sets in LAION's CLIP_benchmark layout, so anyone's CLIP_benchmark pipeline evaluates on
limoe's data (``clip_benchmark eval --dataset wds/NAME --dataset_root DIR``):

    DIR/test/0.tar 1.tar ...        samples: an image (png, jpg or webp) and ``txt`` (captions,
                                    one per line: retrieval) or ``cls`` (a class index)
    DIR/test/nshards.txt            the number of shards
    DIR/train/...                   other splits (a linear probe's train split) beside it
    DIR/dataset_type.txt            ``retrieval`` (absent: classification)
    DIR/classnames.txt              classification: a class name per line, by index
    DIR/zeroshot_classification_templates.txt   classification: prompts with ``{c}``

as CLIP_benchmark's own converter (``clip_benchmark.webdataset_builder``) writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from limoe.data.imagefolder import check_templates
from limoe.data.webdataset import write_shards

SPLIT = "test"  # the split CLIP_benchmark evaluates by default


def write_retrieval(
    pairs: Iterable[tuple[bytes, str, str]],
    out: str | Path,
    samples_per_shard: int = 1000,
    split: str = SPLIT,
) -> list[str]:
    """``(image bytes, extension, caption)`` pairs as a retrieval set's ``split``; returns its
    shards."""
    out = Path(out)
    shards = _write_split(pairs, out / split, samples_per_shard, "txt")
    (out / "dataset_type.txt").write_text("retrieval\n", encoding="utf-8")
    return shards


def write_classification(
    samples: Iterable[tuple[bytes, str, int]],
    classnames: Sequence[str],
    templates: Sequence[str],
    out: str | Path,
    samples_per_shard: int = 1000,
    split: str = SPLIT,
) -> list[str]:
    """``(image bytes, extension, class index)`` samples as a classification set's ``split``
    (zero-shot: ``test``; a linear probe reads ``train`` too), with its class names and prompt
    templates (limoe's ``{}`` written as CLIP_benchmark's ``{c}``); returns its shards."""
    templates = check_templates(templates, "templates")
    if not classnames:
        raise ValueError("a classification set needs at least one class")
    out = Path(out)
    shards = _write_split(samples, out / split, samples_per_shard, "cls")
    (out / "classnames.txt").write_text("".join(f"{c}\n" for c in classnames), encoding="utf-8")
    prompts = "".join(t.replace("{}", "{c}") + "\n" for t in templates)
    (out / "zeroshot_classification_templates.txt").write_text(prompts, encoding="utf-8")
    return shards


def _write_split(
    samples: Iterable[tuple[bytes, str, object]], folder: Path, samples_per_shard: int, label: str
) -> list[str]:
    """Shards ``folder/0.tar ...`` (``write_shards``, the label under ``label``) and
    ``folder/nshards.txt``; stops when there is no sample."""
    shards = write_shards(samples, str(folder / "%d.tar"), samples_per_shard, label)
    if not shards:
        raise ValueError(f"nothing to write to {folder}: the source holds no usable samples")
    (folder / "nshards.txt").write_text(f"{len(shards)}\n", encoding="utf-8")
    return shards
