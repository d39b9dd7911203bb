"""``limoe-benchmark``: LAION's CLIP_benchmark on limoe models, with CLIP_benchmark's own
command line, data loading, metrics and JSON results.

    limoe-benchmark --pretrained logs/train/runs/RUN --dataset wds/scenes \\
        --dataset_root data/cb/scenes --task zeroshot_retrieval --output scenes.json

It is ``clip_benchmark eval`` with one model type more, ``limoe`` (the default here):
``--pretrained`` names a ``limoe-train`` checkpoint, its run folder or a ``limoe-export``
folder, of any arm (``limoe``, ``dense``, ``clip``, ...); the model comes with the transform
and tokenizer it was trained with (``limoe.create_model_and_transforms``). ``--model`` is
only the name written into the results (default ``limoe``). CLIP_benchmark is an optional
extra: ``pip install 'limoe-torch[benchmark]'``.

What differs from ``clip_benchmark eval``, and why:

- Only local data sets in CLIP_benchmark's WebDataset layout (``--dataset wds/NAME``), as
  ``limoe-data export --format clip_benchmark`` writes them: nothing downloads at run time.
  Their folders are checked first, so a missing split or an empty class list ends in one
  line (exit 2) rather than a traceback from inside a loader.
- CLIP_benchmark 1.6.2's classification accuracy calls ``float()`` on a one-element array,
  which numpy 2 refuses; ``accuracy`` here is the same computation with ``.item()``.
- ``--num_workers`` is at most the number of shards of a split: webdataset gives each loader
  worker whole shards, and one with none stops the run.
- Its linear probe runs on CUDA only (it asserts so); on a CPU the command says so and
  ``limoe-eval probe=...`` is the probe to use.

CLIP_benchmark embeds images and captions apart (``encode_image``, ``encode_text``), where
``limoe-eval`` runs them through one forward pass; with the default dropless routing a
token's experts do not depend on its batch, so both give the same features.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from unittest.mock import patch

import torch
from torch import Tensor, nn

from limoe.cli import error_line
from limoe.factory import create_model_and_transforms, get_tokenizer, resolve

MODEL_TYPE = "limoe"
TASKS_NEEDING_CLASSES = ("zeroshot_classification", "linear_probe")


def load_limoe(
    model_name: str, pretrained: str, cache_dir: str | None = None, device: str = "cpu"
) -> tuple[nn.Module, object, object]:
    """CLIP_benchmark's model loader (``clip_benchmark.models.TYPE2FUNC``): ``(model in eval
    mode, its evaluation transform, its tokenizer)``; ``model_name`` is only a label."""
    model, _, transform = create_model_and_transforms(pretrained, device=device)
    return model, transform, get_tokenizer(pretrained)


def accuracy(output: Tensor, target: Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """CLIP_benchmark's top-k accuracy (``metrics.zeroshot_classification.accuracy``) with
    ``.item()`` where it calls ``float()`` on a one-element array (an error in numpy 2)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def _clip_benchmark() -> ModuleType:
    try:
        import clip_benchmark.cli as cli
    except ImportError as error:
        raise ValueError(
            f"limoe-benchmark needs CLIP_benchmark ({error}): pip install 'limoe-torch[benchmark]'"
        ) from None
    return cli


def register() -> None:
    """Add the ``limoe`` model type to CLIP_benchmark and mend its accuracy for numpy 2."""
    from clip_benchmark import models
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    models.TYPE2FUNC[MODEL_TYPE] = load_limoe
    if MODEL_TYPE not in models.MODEL_TYPES:  # the list its parser offers as choices
        models.MODEL_TYPES.append(MODEL_TYPE)
    zeroshot_classification.accuracy = linear_probe.accuracy = accuracy


def with_defaults(argv: Sequence[str]) -> list[str]:
    """``eval`` unless ``build`` is asked for; ``--model_type limoe`` and ``--model limoe``
    unless given."""
    argv = list(argv)
    if not argv or argv[0] not in ("eval", "build"):
        argv = ["eval", *argv]
    if argv[0] == "eval":
        given = {arg.split("=", 1)[0] for arg in argv}
        if "--model_type" not in given:
            argv += ["--model_type", MODEL_TYPE]
        if "--model" not in given and "--pretrained_model" not in given:
            argv += ["--model", MODEL_TYPE]
    return argv


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def dataset_root(args: object, name: str) -> Path:
    """``--dataset_root`` for one data set, as CLIP_benchmark fills its ``{dataset}``."""
    short = name.removeprefix("wds/")
    return Path(args.dataset_root.format(dataset=short, dataset_cleaned=short.replace("/", "-")))


def dataset_task(root: Path) -> str:
    """The zero-shot task of a data set in CLIP_benchmark's layout: ``dataset_type.txt`` says
    ``retrieval``, or it is a classification set."""
    kind = root / "dataset_type.txt"
    if kind.is_file() and kind.read_text(encoding="utf-8").strip().lower() == "retrieval":
        return "zeroshot_retrieval"
    return "zeroshot_classification"


def check_dataset(name: str, root: Path, task: str, splits: Sequence[str]) -> None:
    """Stop with one line unless ``root`` holds a local CLIP_benchmark data set with these
    splits, and, for a classification task, class names and (zero-shot) prompt templates."""
    if not name.startswith("wds/"):
        raise ValueError(
            f"--dataset {name}: limoe-benchmark reads local data sets in CLIP_benchmark's "
            "layout (--dataset wds/NAME --dataset_root DIR, written by limoe-data export "
            "--format clip_benchmark); nothing downloads"
        )
    if not root.is_dir():
        raise ValueError(f"--dataset_root {root} (for {name}) is not a folder")
    for split in splits:
        if not (root / split / "nshards.txt").is_file():
            raise ValueError(f"{root / split / 'nshards.txt'} does not exist: no {split} split")
    if dataset_task(root) == "zeroshot_retrieval":
        if task in TASKS_NEEDING_CLASSES:
            raise ValueError(f"{name} at {root} is a retrieval set: --task {task} needs classes")
        return
    files = ["classnames.txt"]
    if task == "zeroshot_classification":
        files.append("zeroshot_classification_templates.txt")
    for file in files:
        path = root / file
        if not path.is_file() or not path.read_text(encoding="utf-8").strip():
            raise ValueError(f"{path} is missing or empty: {name} has no classes to classify")


def check_eval(args: object) -> None:
    """The checks of one ``eval``: every limoe model loads, every data set is there, and a
    linear probe has the GPU CLIP_benchmark's probe asserts. ``--task auto`` becomes the
    task the data sets' layout says (CLIP_benchmark's own guess knows only its named sets)."""
    if args.task == "linear_probe" and not torch.cuda.is_available():
        raise ValueError(
            "CLIP_benchmark's linear probe runs on CUDA only (it asserts device == 'cuda'); "
            "on a CPU run limoe-eval probe=..."
        )
    if args.model_type == MODEL_TYPE:
        for source in _as_list(args.pretrained):
            _check_model(source)
    names = _as_list(args.dataset)
    if args.task == "auto":
        tasks = {dataset_task(dataset_root(args, name)) for name in names}
        if len(tasks) > 1:
            raise ValueError("--task auto: the data sets mix retrieval and classification; "
                             "give --task")  # fmt: skip
        args.task = tasks.pop()
    splits = [args.split]
    if args.task == "linear_probe":
        splits += _as_list(args.train_split) + _as_list(args.val_split or [])
    for name in names:
        check_dataset(name, dataset_root(args, name), args.task, splits)
    # webdataset hands each loader worker whole shards, and a worker with none stops the run
    # ("No samples found"): a small set has fewer shards than CLIP_benchmark's 4 workers.
    shards = min(_shards(dataset_root(args, name) / split) for name in names for split in splits)
    args.num_workers = min(args.num_workers, shards)


def _shards(split: Path) -> int:
    return int((split / "nshards.txt").read_text(encoding="utf-8").strip())


def _check_model(source: str) -> None:
    """One line naming ``--pretrained`` for what is not a limoe model."""
    try:
        resolve(source)
    except ValueError as error:
        message = str(error)
        raise ValueError(f"--pretrained {message.removeprefix('ckpt=')}") from None


def main(argv: Sequence[str] | None = None) -> None:
    """``limoe-benchmark [eval] --pretrained PATH --dataset wds/NAME --dataset_root DIR ...``
    (``limoe-benchmark build RESULTS... --output CSV``: CLIP_benchmark's table of results)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli = _clip_benchmark()
        register()
        with patch.object(sys, "argv", ["limoe-benchmark", *with_defaults(argv)]):
            _, args = cli.get_parser_args()
        if args.which == "build":
            cli.main_build(args)
            return
        check_eval(args)
        cli.main_eval(args)
    except (ValueError, OSError) as error:
        print(f"limoe-benchmark: error: {error_line(error)}", file=sys.stderr)
        sys.exit(2)
