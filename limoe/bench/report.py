"""What a benchmark run prints and records: the machine, a table, and the issue's targets."""

from __future__ import annotations

import os
import platform

import torch

# The targets of the "Fast MoE" issue, read off one run (CPU float32, top-1, dropless,
# 16k tokens, dim 256, hidden 1024): (name, what is compared, bound, "max" or "min").
LAYER_TARGETS = (
    ("sorted fwd+bwd time / dense, E=8", 8, "time_vs_dense", 1.15, "max"),
    ("sorted fwd+bwd time / dense, E=32", 32, "time_vs_dense", 1.25, "max"),
    ("one-hot fwd+bwd time / sorted, E=32", 32, "onehot_vs_sorted", 4.0, "min"),
)
TRAIN_TARGET = ("limoe pairs/s / dense pairs/s", 0.85, "min")
FEED_TARGET = ("training pairs/s fed from files / from memory", 0.9, "min")


def machine_info(device: str | torch.device) -> dict:
    """Where the figures come from: CPU, threads, GPU name, library versions."""
    device = torch.device(device)
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _row(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def check_targets(
    layer_rows: list[dict], train_rows: list[dict], feed_rows: list[dict] = ()
) -> list[dict]:
    """Each target whose measurements are in the run: its value, bound and whether it is met.

    Layer targets use the top-1, dropless, forward+backward rows at 16384 tokens and dim
    256 (the issue's shape); a run without those rows has no layer targets to check.
    """
    targets = []
    shape = {"top_k": 1, "capacity_factor": None, "tokens": 16384, "dim": 256, "pass": "fwd_bwd"}
    for name, experts, measure, bound, kind in LAYER_TARGETS:
        fast = _row(layer_rows, **shape, num_experts=experts, mode="sorted")
        if fast is None:
            continue
        if measure == "time_vs_dense":
            value = fast["time_vs_dense"]
        else:
            onehot = _row(layer_rows, **shape, num_experts=experts, mode="onehot")
            value = None if onehot is None else onehot["median_s"] / fast["median_s"]
        if value is not None:
            targets.append(_target(name, value, bound, kind))
    limoe = _row(train_rows, model="limoe")
    if limoe is not None and limoe["pairs_per_s_vs_dense"] is not None:
        targets.append(_target(TRAIN_TARGET[0], limoe["pairs_per_s_vs_dense"], *TRAIN_TARGET[1:]))
    for feed in feed_rows:
        targets.append(_target(FEED_TARGET[0], feed["files_vs_memory"], *FEED_TARGET[1:]))
    return targets


def _target(name: str, value: float, bound: float, kind: str) -> dict:
    met = value <= bound if kind == "max" else value >= bound
    return {"target": name, "value": value, "bound": bound, "kind": kind, "met": met}


def _cf(value: float | None) -> str:
    return "dropless" if value is None else f"{value:g}"


def _layer_table(rows: list[dict]) -> list[str]:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    head = "| E | k | capacity | tokens | dim | pass | " + " | ".join(f"{m} ms" for m in modes)
    lines = [head + " |", "|" + "---|" * (6 + len(modes))]
    keys = ("num_experts", "top_k", "capacity_factor", "tokens", "dim", "pass")
    groups = dict.fromkeys(tuple(r[k] for k in keys) for r in rows)
    for key in groups:
        cells = []
        for mode in modes:
            r = _row(rows, **dict(zip(keys, key)), mode=mode)
            ratio = (
                ""
                if r is None or r["time_vs_dense"] is None or mode == "dense"
                else (f" ({r['time_vs_dense']:.2f}×)")
            )
            cells.append("—" if r is None else f"{1e3 * r['median_s']:.1f}{ratio}")
        e, k, cf, n, d, p = key
        lines.append(f"| {e} | {k} | {_cf(cf)} | {n} | {d} | {p} | " + " | ".join(cells) + " |")
    return lines


def _train_table(rows: list[dict]) -> list[str]:
    lines = ["| model | batch | step ms | pairs/s | × dense |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "—" if r["pairs_per_s_vs_dense"] is None else f"{r['pairs_per_s_vs_dense']:.2f}"
        lines.append(f"| {r['model']} | {r['batch_size']} | {1e3 * r['median_s']:.1f} | "
                     f"{r['pairs_per_s']:.0f} | {ratio} |")  # fmt: skip
    return lines


def _loader_table(rows: list[dict]) -> list[str]:
    lines = [
        "| format | px | workers | batch | pairs/s | pairs/s per worker |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['format']} | {r['image_size']} | {r['num_workers']} | "
                     f"{r['batch_size']} | {r['pairs_per_s']:.0f} | {r['pairs_per_s_per_worker']:.0f} |")  # fmt: skip
    return lines


def _feed_table(rows: list[dict]) -> list[str]:
    lines = ["| model | files px → input px | workers | batch | in memory pairs/s | from files pairs/s | files / memory |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['file_size']} → {r['image_size']} | {r['num_workers']} | "
                     f"{r['batch_size']} | {r['memory_pairs_per_s']:.0f} | {r['files_pairs_per_s']:.0f} | "
                     f"{r['files_vs_memory']:.2f} |")  # fmt: skip
    return lines


def format_table(results: dict) -> str:
    """Markdown tables of a run (layer times with the ratio to dense in brackets; training
    pairs/s) and the targets, as ``limoe-bench`` prints them."""
    lines = []
    if results.get("layer"):
        lines += ["MoE layer (median of the repeats; × = time / dense MLP):", ""]
        lines += _layer_table(results["layer"]) + [""]
    if results.get("train"):
        lines += ["Training step:", ""] + _train_table(results["train"]) + [""]
    if results.get("loaders"):
        lines += ["Training loader (decoded and transformed pairs):", ""]
        lines += _loader_table(results["loaders"]) + [""]
    if results.get("feed"):
        lines += ["Training fed by the file loader:", ""] + _feed_table(results["feed"]) + [""]
    for t in results.get("targets", []):
        sign = "≤" if t["kind"] == "max" else "≥"
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"target {t['target']}: {t['value']:.2f} ({sign} {t['bound']}) {verdict}")
    return "\n".join(lines)
