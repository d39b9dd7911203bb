"""Data sets in LAION's CLIP_benchmark layout, so anyone's CLIP_benchmark pipeline evaluates on
limoe's data (``clip_benchmark eval --dataset wds/NAME --dataset_root DIR``):

    DIR/test/0.tar 1.tar ...        samples: an image (png, jpg or webp) and ``txt`` (captions,
                                    one per line: retrieval) or ``cls`` (a class index)
    DIR/test/nshards.txt            the number of shards
    DIR/dataset_type.txt            ``retrieval`` (absent: classification)
    DIR/classnames.txt              classification: a class name per line, by index
    DIR/zeroshot_classification_templates.txt   classification: prompts with ``{c}``

as CLIP_benchmark's own converter (``clip_benchmark.webdataset_builder``) writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import webdataset as wds

from limoe.data.imagefolder import check_templates

SPLIT = "test"  # the split CLIP_benchmark evaluates by default


def write_retrieval(
    pairs: Iterable[tuple[bytes, str, str]], out: str | Path, samples_per_shard: int = 1000
) -> int:
    """``(image bytes, extension, caption)`` pairs as a retrieval set; returns their number."""
    out = Path(out)
    count = _write_samples((_sample(image, ext, txt=caption) for image, ext, caption in pairs),
                           out, samples_per_shard)  # fmt: skip
    (out / "dataset_type.txt").write_text("retrieval\n", encoding="utf-8")
    return count


def write_classification(
    samples: Iterable[tuple[bytes, str, int]],
    classnames: Sequence[str],
    templates: Sequence[str],
    out: str | Path,
    samples_per_shard: int = 1000,
) -> int:
    """``(image bytes, extension, class index)`` samples as a zero-shot classification set,
    with its class names and prompt templates (limoe's ``{}`` written as CLIP_benchmark's
    ``{c}``); returns their number."""
    templates = check_templates(templates, "templates")
    if not classnames:
        raise ValueError("a classification set needs at least one class")
    out = Path(out)
    count = _write_samples((_sample(image, ext, cls=label) for image, ext, label in samples),
                           out, samples_per_shard)  # fmt: skip
    (out / "classnames.txt").write_text("".join(f"{c}\n" for c in classnames), encoding="utf-8")
    prompts = "".join(t.replace("{}", "{c}") + "\n" for t in templates)
    (out / "zeroshot_classification_templates.txt").write_text(prompts, encoding="utf-8")
    return count


def _sample(image: bytes, ext: str, **label: object) -> dict:
    return {ext: image, **label}


def _write_samples(samples: Iterable[dict], out: Path, samples_per_shard: int) -> int:
    """Shards ``out/test/0.tar ...`` (keys ``s0000000`` ..., as CLIP_benchmark's converter
    names them) and ``out/test/nshards.txt``; stops, writing no count, when there is no
    sample."""
    folder = out / SPLIT
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    with wds.ShardWriter(str(folder / "%d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for count, sample in enumerate(samples, start=1):
            sink.write({"__key__": f"s{count - 1:07d}", **sample})
        shards = sink.shard
    if not count:
        raise ValueError(f"nothing to write to {folder}: the source holds no usable samples")
    (folder / "nshards.txt").write_text(f"{shards}\n", encoding="utf-8")
    return count
