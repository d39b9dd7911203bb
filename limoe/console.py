"""What a run says on the console: the libraries' notes that do not apply to a limoe run are
silenced, and a training run ends in a short summary a person reads at a glance (headline
metrics, the routing in one line per MoE layer, where the run is and what to run next).
Every metric stays in the run's ``metrics.json``, and, under ``limoe-train``, in its log file.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning_utilities.core.rank_zero as rank_zero

log = logging.getLogger("limoe")
if not logging.getLogger().handlers:  # as Lightning does: shown where nothing set up logging
    log.addHandler(logging.StreamHandler(sys.stdout))
    log.setLevel(logging.INFO)
    log.propagate = False
# The full metric list: the run's log file only (conf/train.yaml routes this logger there).
metrics_log = logging.getLogger("limoe.metrics")

# Lightning's and torch's notes that say nothing about a limoe run.
ADVERT = "litlogger"  # Lightning's tip to install its cloud logger, on every run
DEPRECATIONS = (  # raised inside the libraries, not by anything a user wrote
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
EXPERT_KINDS = ("image", "text", "shared", "unused")


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return ADVERT not in record.getMessage()


def quiet_libraries() -> None:
    """Silence the advert and the libraries' own deprecations (errors and warnings that
    concern the run stay). Safe to call more than once."""
    for message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    logger = rank_zero.log  # the logger Lightning's rank_zero_info writes through
    if not any(isinstance(f, _DropAdvert) for f in logger.filters):
        logger.addFilter(_DropAdvert())
    _lightning_to_root()


def _lightning_to_root() -> None:
    """Where the root logger has handlers (Hydra's console and log file under ``limoe-train``),
    Lightning's and limoe's messages go through them, so the log file holds the whole
    console. Both give their loggers a handler of their own when imported before any logging
    is set up, as they are here."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "limoe"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def quiet_fresh_log_dir(log_dir: str | Path) -> None:
    """Lightning's CSV logger warns that a run directory which already holds files (Hydra's
    config and log) "is not empty" and that "previous log files will be deleted": true only
    where a ``metrics.csv`` is there to be replaced, so the warning is kept for that case."""
    log_dir = Path(log_dir)
    if not (log_dir / "metrics.csv").exists():
        pattern = rf"Experiment logs directory {re.escape(str(log_dir))}/? exists and is not empty"
        warnings.filterwarnings("ignore", message=pattern)


def _stages(metrics: Mapping[str, float]) -> list[str]:
    """The evaluation sets of a run (``test``, ``test_novel``, ...), in the order found."""
    stages = [k.split("/")[0] for k in metrics if k.startswith("test") and "/" in k]
    return list(dict.fromkeys(stages))


def _tasks(metrics: Mapping[str, float], stage: str) -> list[str]:
    suffix = "_zeroshot_top1"
    return sorted(k[len(stage) + 1 : -len(suffix)] for k in metrics
                  if k.startswith(f"{stage}/") and k.endswith(suffix))  # fmt: skip


def metrics_table(metrics: Mapping[str, float]) -> list[str]:
    """One row per evaluation set: image-to-text and text-to-image R@1, then the zero-shot
    top-1 accuracy of each task."""
    stages = _stages(metrics)
    if not stages:
        return []
    tasks = list(dict.fromkeys(t for stage in stages for t in _tasks(metrics, stage)))
    columns = [("i->t R@1", "image_to_text_R@1"), ("t->i R@1", "text_to_image_R@1")]
    columns += [(task, f"{task}_zeroshot_top1") for task in tasks]
    width = max(len(s) for s in stages)
    sizes = [max(8, len(title)) for title, _ in columns]  # each column as wide as its title
    lines = [" " * width + "".join(f"  {t:>{n}}" for (t, _), n in zip(columns, sizes))]
    if tasks:
        lines[0] += "  (zero-shot top-1)"
    for stage in stages:
        cells = [metrics.get(f"{stage}/{key}") for _, key in columns]
        row = "".join(f"  {v:{n}.3f}" if v is not None else f"  {'-':>{n}}"
                      for v, n in zip(cells, sizes))  # fmt: skip
        lines.append(f"{stage:<{width}}{row}")
    return lines


def probe_lines(metrics: Mapping[str, float]) -> list[str]:
    """One line per linear probe (``probe/NAME_acc1``, ...)."""
    names = [k.removeprefix("probe/").removesuffix("_acc1") for k in metrics
             if k.startswith("probe/") and k.endswith("_acc1")]  # fmt: skip
    return [
        f"linear probe {name}: top-1 {metrics[f'probe/{name}_acc1']:.3f}, top-5 "
        f"{metrics[f'probe/{name}_acc5']:.3f}, mean per-class recall "
        f"{metrics[f'probe/{name}_mean_per_class_recall']:.3f} (weight decay "
        f"{metrics[f'probe/{name}_weight_decay']:.3g})"
        for name in names
    ]


def routing_lines(metrics: Mapping[str, float]) -> list[str]:
    """One line per MoE layer: how many experts take only image tokens, only text tokens,
    both, or (almost) none, at the last validation; and the tokens each modality dropped."""
    layers = sorted(
        {int(m.group(1)) for k in metrics if (m := re.match(r"routing/layer(\d+)/", k))}
    )
    lines = []
    for layer in layers:
        prefix = f"routing/layer{layer}"
        counts = [int(metrics.get(f"{prefix}/{kind}_experts", 0)) for kind in EXPERT_KINDS]
        dropped = [metrics.get(f"{prefix}/{m}_dropped", 0.0) for m in ("image", "text")]
        lines.append(
            f"  layer {layer}: {' / '.join(map(str, counts))} of {sum(counts)}; "
            f"dropped {dropped[0]:.1%} of image, {dropped[1]:.1%} of text tokens"
        )
    if lines:
        lines.insert(0, "experts per MoE layer (image-only / text-only / shared / unused):")
    return lines


def train_summary(metrics: Mapping[str, float], run_dir: str | Path) -> str:
    """The end of ``limoe-train``'s console."""
    run_dir = Path(run_dir)
    lines = ["", "limoe: done"]
    if "train/steps" in metrics:
        lines[-1] += (
            f": {int(metrics['train/steps'])} steps in {metrics['train/wall_seconds']:.0f} s "
            f"({metrics['train/samples_per_second']:.0f} pairs/s)"
        )
    if "model/flops_per_pair" in metrics:
        lines[-1] += f", {metrics['model/flops_per_pair'] / 1e6:.2f} MFLOPs forward per pair"
    lines += metrics_table(metrics)
    lines += routing_lines(metrics)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    lines += [
        f"run: {run_dir} (every metric in metrics.json)",
        f"next: limoe-analyze ckpt={ckpt}",
        f"      limoe-compare {run_dir} OTHER_RUN...",
    ]
    return "\n".join(lines)


def log_metrics(metrics: Mapping[str, float]) -> None:
    """Every metric, one per line, into the log file (not the console)."""
    for key in sorted(metrics):
        metrics_log.info("%s: %.6g", key, metrics[key])
