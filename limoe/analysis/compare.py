"""``limoe-compare``: gather finished runs into a table and learning curves, one group per arm.

A run is a directory with ``metrics.json`` (its arm, final test metrics and costs, and config)
and ``metrics.csv`` (Lightning's CSVLogger); its arm is the ``model`` config it was composed
with, or what ``arm=...`` named it. Runs of one arm (one per seed) become mean ± std (sample
std; 0 for a single seed) in the table and a band in the plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from limoe.analysis import plots
from limoe.lit.callbacks import read_history
from limoe.runs import read_metrics

# forward + backward of a training step costs about three forward passes
TRAIN_FLOPS_PER_FORWARD = 3
ARM_ORDER = ("limoe", "dense", "multiway", "clip")


@dataclass
class Run:
    arm: str
    batch_size: int
    metrics: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # RoutingHistory records, MoE runs only


# Plotted when the runs validated nothing (data without a val split, such as data=tabler).
TRAIN_CURVE = "train/contrastive_loss"


def read_curves(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``val/`` column of a CSVLogger file, and the training contrastive loss, as
    ``[(step, value), ...]``."""
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    if not metrics_csv.is_file():
        return {}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if (key.startswith("val/") or key == TRAIN_CURVE) and value not in ("", None):
                    curves[key].append((int(row["step"]), float(value)))
    return dict(curves)


def load_run(run_dir: Path) -> Run:
    """A run from its ``metrics.json`` (arm, metrics, config) and ``metrics.csv`` (curves)."""
    record = read_metrics(run_dir / "metrics.json")
    batch_size = record.config.get("data", {}).get("batch_size")
    if batch_size is None:
        raise ValueError(f"{run_dir}/metrics.json records no config (data.batch_size)")
    history_path = run_dir / "routing" / "history.jsonl"
    history = read_history(history_path) if history_path.is_file() else []
    return Run(arm=record.arm or run_dir.name, batch_size=int(batch_size),
               metrics=record.metrics, curves=read_curves(run_dir / "metrics.csv"),
               history=history)  # fmt: skip


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run under ``paths`` (a run directory or any folder above runs)."""
    run_dirs = set()
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory")
        run_dirs.update(p.parent for p in path.rglob("metrics.json"))  # path itself included
    if not run_dirs:
        raise ValueError(f"no run with a metrics.json under {', '.join(map(str, paths))}")
    return [load_run(d) for d in sorted(run_dirs)]


def group_by_arm(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.arm].append(run)
    order = {arm: i for i, arm in enumerate(ARM_ORDER)}
    return {arm: groups[arm] for arm in sorted(groups, key=lambda a: (order.get(a, 99), a))}


def mean_std(values: list[float]) -> tuple[float, float]:
    values_array = np.asarray(values, dtype=float)
    std = float(values_array.std(ddof=1)) if len(values_array) > 1 else 0.0
    return float(values_array.mean()), std


def summarise(groups: dict[str, list[Run]]) -> list[dict]:
    """One row per (arm, metric): mean, std and the number of seeds that reported it."""
    rows = []
    for arm, runs in groups.items():
        keys = sorted({k for run in runs for k in run.metrics})
        for key in keys:
            values = [run.metrics[key] for run in runs if key in run.metrics]
            mean, std = mean_std(values)
            rows.append({"arm": arm, "metric": key, "mean": mean, "std": std, "n": len(values)})
    return rows


def _format(mean: float, std: float, metric: str) -> str:
    if metric.startswith("model/") or abs(mean) >= 1000:
        scale = 1e6 if abs(mean) >= 1e6 else 1.0
        suffix = "M" if scale > 1 else ""
        return f"{mean / scale:.2f}{suffix} ± {std / scale:.2f}{suffix}"
    return f"{mean:.3f} ± {std:.3f}"


def _metric_order(metric: str) -> tuple[int, str]:
    """Test metrics first, then held-out pairs, routing, costs and speed."""
    prefixes = ("test/", "test_novel/", "routing/", "model/", "train/")
    rank = next((i for i, p in enumerate(prefixes) if metric.startswith(p)), len(prefixes))
    return rank, metric


def markdown_table(rows: list[dict], arms: list[str]) -> str:
    """Metrics down, arms across: ``mean ± std`` over seeds."""
    cells = {(r["arm"], r["metric"]): _format(r["mean"], r["std"], r["metric"]) for r in rows}
    seeds = {r["arm"]: r["n"] for r in rows}
    metrics = sorted({r["metric"] for r in rows}, key=_metric_order)
    header = "| metric | " + " | ".join(f"{a} (n={seeds[a]})" for a in arms) + " |"
    lines = [header, "|" + " --- |" * (len(arms) + 1)]
    for metric in metrics:
        values = [cells.get((arm, metric), "") for arm in arms]
        lines.append(f"| `{metric}` | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "metric", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(rows)


def curve_band(runs: list[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps every run logged ``key`` at, with the mean and std of the value there."""
    per_run = [dict(run.curves.get(key, [])) for run in runs]
    steps = sorted(set.intersection(*(set(c) for c in per_run))) if per_run else []
    values = np.array([[c[s] for s in steps] for c in per_run], dtype=float).reshape(
        len(per_run), len(steps)
    )
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
    return np.asarray(steps), values.mean(axis=0), std


def training_flops(runs: list[Run], steps: np.ndarray) -> np.ndarray:
    """Training FLOPs spent by ``steps``: steps x batch x 3 x forward FLOPs per pair."""
    run = runs[0]
    per_pair = run.metrics.get("model/flops_per_pair", math.nan)
    return steps * run.batch_size * TRAIN_FLOPS_PER_FORWARD * per_pair


def curve_keys(groups: dict[str, list[Run]]) -> list[str]:
    """Validation R@1 (both directions) and every zero-shot top-1 the runs logged; the
    training contrastive loss when they validated nothing."""
    keys = {k for runs in groups.values() for run in runs for k in run.curves}
    wanted = [k for k in sorted(keys) if k.endswith(("_R@1", "_zeroshot_top1"))]
    if not wanted and TRAIN_CURVE in keys:
        return [TRAIN_CURVE]
    return sorted(wanted, key=lambda k: (not k.endswith("_R@1"), k))


def curves_figure(groups: dict[str, list[Run]], x_axis: str) -> Figure:
    """One panel per validation metric, one line per arm, a band of ± 1 std over seeds;
    ``x_axis`` is ``step`` or ``flops`` (training FLOPs)."""
    keys = curve_keys(groups)
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="tight")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for arm, runs in groups.items():
            steps, mean, std = curve_band(runs, key)
            x = steps if x_axis == "step" else training_flops(runs, steps)
            (line,) = ax.plot(x, mean, label=f"{arm} (n={len(runs)})")
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step" if x_axis == "step" else "training FLOPs (3 x forward)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return fig


def routing_figures(groups: dict[str, list[Run]], out: Path) -> dict[str, Path]:
    """``expert_shares.png`` (each arm's first seed at its last record) and ``collapse.png``
    (busiest-expert share over training) for the arms whose runs recorded their routing."""
    routed = {arm: runs for arm, runs in groups.items() if all(run.history for run in runs)}
    if not routed:
        return {}
    last = {arm: runs[0].history[-1]["layers"] for arm, runs in routed.items()}
    histories = {arm: [run.history for run in runs] for arm, runs in routed.items()}
    return {
        "expert_shares.png": plots.save(plots.plot_arm_expert_shares(last),
                                        out / "expert_shares.png"),
        "collapse.png": plots.save(plots.plot_collapse(histories), out / "collapse.png"),
    }  # fmt: skip


def compare(paths: list[Path], out: Path) -> dict[str, Path]:
    """Write ``comparison.md``, ``comparison.csv``, ``curves_step.png``, ``curves_flops.png``
    and, for MoE runs, ``expert_shares.png`` and ``collapse.png``."""
    groups = group_by_arm(find_runs(paths))
    rows = summarise(groups)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in
             ("comparison.md", "comparison.csv", "curves_step.png", "curves_flops.png")}  # fmt: skip
    files["comparison.md"].write_text(markdown_table(rows, list(groups)))
    write_csv(rows, files["comparison.csv"])
    plots.save(curves_figure(groups, "step"), files["curves_step.png"])
    plots.save(curves_figure(groups, "flops"), files["curves_flops.png"])
    files.update(routing_figures(groups, out))
    return files


def main(argv: list[str] | None = None) -> None:
    """``limoe-compare DIR... [--out DIR]``"""
    parser = argparse.ArgumentParser(prog="limoe-compare", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run directories or folders above runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the table and plots (default: the first DIR)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        files = compare(args.dirs, args.out or args.dirs[0])
    except (ValueError, KeyError, json.JSONDecodeError) as error:
        print(f"limoe-compare: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(files["comparison.md"].read_text())
    for path in files.values():
        print(f"wrote {path}")
