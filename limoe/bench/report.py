"""What a benchmark run prints and records: the machine, a table, and the issue's targets."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping

import torch

# The targets of the "Fast MoE" issue, read off one run (CPU float32, top-1, dropless,
# 16k tokens, dim 256, hidden 1024): (name, what is compared, bound, "max" or "min").
LAYER_TARGETS = (
    ("sorted fwd+bwd time / dense, E=8", 8, "time_vs_dense", 1.15, "max"),
    ("sorted fwd+bwd time / dense, E=32", 32, "time_vs_dense", 1.25, "max"),
    ("one-hot fwd+bwd time / sorted, E=32", 32, "onehot_vs_sorted", 4.0, "min"),
)
TRAIN_TARGET = ("limoe pairs/s / dense pairs/s", 0.9, "min")
FEED_TARGET = ("training pairs/s fed from files / from memory", 0.9, "min")
# suite=cost: each LIMoE preset's forward FLOPs per pair within 10 % of its CLIP's.
COST_TARGET = ("FLOPs per pair / ", 0.1, "within")
# suite=gpu (issue "Paper scale"): the bf16 MoE layer's forward+backward throughput at E=8 (its
# faster GEMM path, top-1) against the dense MLP's, and the LIMoE-B/32 step against dense B/32.
GPU_LAYER_TARGET = ("bf16 MoE fwd+bwd throughput / dense MLP, E=8", 0.8, "min")
GPU_COMPILED_LAYER_TARGET = (
    "compiled bf16 MoE fwd+bwd throughput / compiled dense MLP, E=8",
    0.9,
    "min",
)
GPU_TRAIN_TARGET = ("limoe_b32 pairs/s / dense_b32 pairs/s", 0.85, "min")


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


def check_targets(results: Mapping) -> list[dict]:
    """Each target whose measurements are in the run (``results``' rows by suite): its value,
    bound and whether it is met.

    Layer targets use the top-1, dropless, forward+backward rows at 16384 tokens and dim
    256 (the issue's shape); a run without those rows has no layer targets to check.
    """
    targets = _layer_targets(results.get("layer", []))
    limoe = _row(results.get("train", []), model="limoe")
    if limoe is not None and limoe["pairs_per_s_vs_dense"] is not None:
        targets.append(_target(TRAIN_TARGET[0], limoe["pairs_per_s_vs_dense"], *TRAIN_TARGET[1:]))
    for feed in results.get("feed", []):
        targets.append(_target(FEED_TARGET[0], feed["files_vs_memory"], *FEED_TARGET[1:]))
    for row in results.get("cost", []):
        if row["against"] and row["model"].startswith("limoe"):
            name = f"{row['model']} {COST_TARGET[0]}{row['against']}"
            targets.append(_target(name, row["flops_vs_against"], *COST_TARGET[1:]))
    return targets + _gpu_targets(results.get("gpu_layer", []), results.get("gpu_train", []))


def _gpu_targets(layer_rows: list[dict], train_rows: list[dict]) -> list[dict]:
    targets = []
    for compiled, (name, bound, kind) in ((False, GPU_LAYER_TARGET),
                                          (True, GPU_COMPILED_LAYER_TARGET)):  # fmt: skip
        moe = [r for r in layer_rows if r["num_experts"] == 8 and r["pass"] == "fwd_bwd"
               and r["top_k"] == 1 and not r["mode"].startswith("dense")
               and r["mode"].endswith("-compiled") == compiled]  # fmt: skip
        if moe:
            best = min(r["time_vs_dense"] for r in moe)
            targets.append(_target(name, 1 / best, bound, kind))
    b32 = _row(train_rows, model="limoe_b32")
    if b32 is not None and b32["pairs_per_s_vs_dense"] is not None:
        targets.append(_target(GPU_TRAIN_TARGET[0], b32["pairs_per_s_vs_dense"],
                               *GPU_TRAIN_TARGET[1:]))  # fmt: skip
    return targets


def _layer_targets(layer_rows: list[dict]) -> list[dict]:
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
    return targets


def _target(name: str, value: float, bound: float, kind: str) -> dict:
    """``kind``: max (value <= bound), min (value >= bound) or within (|value - 1| <= bound)."""
    met = {"max": value <= bound, "min": value >= bound, "within": abs(value - 1) <= bound}[kind]
    return {"target": name, "value": value, "bound": bound, "kind": kind, "met": met}


def _cf(value: float | None) -> str:
    return "dropless" if value is None else f"{value:g}"


def _layer_table(rows: list[dict]) -> list[str]:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    keys = ("num_experts", "top_k", "capacity_factor", "tokens", "dim", "pass")
    groups = dict.fromkeys(tuple(r[k] for k in keys) for r in rows)
    table = []
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
        table.append([str(e), str(k), _cf(cf), str(n), str(d), str(p), *cells])
    header = ["E", "k", "capacity", "tokens", "dim", "pass", *(f"{m} ms" for m in modes)]
    return _markdown(header, table)


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table: the header, its rule, one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _number(value: float | None, digits: int = 2) -> str:
    """A table cell: the value to ``digits`` decimals, or a dash where there is none."""
    return "—" if value is None else f"{value:.{digits}f}"


def _train_table(rows: list[dict]) -> list[str]:
    return _markdown(
        ["model", "batch", "step ms", "pairs/s", "× dense"],
        [[r["model"], str(r["batch_size"]), f"{1e3 * r['median_s']:.1f}",
          f"{r['pairs_per_s']:.0f}", _number(r["pairs_per_s_vs_dense"])] for r in rows],
    )  # fmt: skip


def _loader_table(rows: list[dict]) -> list[str]:
    return _markdown(
        ["format", "px", "workers", "batch", "pairs/s", "pairs/s per worker"],
        [[r["format"], str(r["image_size"]), str(r["num_workers"]), str(r["batch_size"]),
          f"{r['pairs_per_s']:.0f}", f"{r['pairs_per_s_per_worker']:.0f}"] for r in rows],
    )  # fmt: skip


def _feed_table(rows: list[dict]) -> list[str]:
    return _markdown(
        ["model", "files px → input px", "workers", "batch", "in memory pairs/s",
         "from files pairs/s", "files / memory"],
        [[r["model"], f"{r['file_size']} → {r['image_size']}", str(r["num_workers"]),
          str(r["batch_size"]), f"{r['memory_pairs_per_s']:.0f}", f"{r['files_pairs_per_s']:.0f}",
          f"{r['files_vs_memory']:.2f}"] for r in rows],
    )  # fmt: skip


def _cost_table(rows: list[dict]) -> list[str]:
    return _markdown(
        ["model", "px", "text positions", "parameters", "active per token", "GFLOPs per pair",
         "× against"],
        [[r["model"], str(r["image_size"]), str(r["context_length"]),
          f"{r['params_total'] / 1e6:,.1f}M", f"{r['params_active_per_token'] / 1e6:,.1f}M",
          f"{r['flops_per_pair'] / 1e9:.2f}",
          "—" if r["against"] is None else f"{r['flops_vs_against']:.3f} ({r['against']})"]
         for r in rows],
    )  # fmt: skip


def _gpu_train_table(rows: list[dict]) -> list[str]:
    return _markdown(
        ["model", "batch", "steps", "pairs/s", "× dense", "peak memory GiB", "last loss"],
        [[r["model"], str(r["batch_size"]), str(r["steps"]), f"{r['pairs_per_s']:.0f}",
          _number(r["pairs_per_s_vs_dense"]), _number(r["peak_memory_gib"], 1),
          f"{r['final_loss']:.3f}"] for r in rows],
    )  # fmt: skip


def _ddp_table(rows: list[dict]) -> list[str]:
    return _markdown(
        ["processes", "model", "steps", "pairs/s (all processes)", "finite"],
        [[str(r["processes"]), r["model"], str(r["steps"]), f"{r['pairs_per_s']:.0f}",
          str(r["finite"])] for r in rows],
    )  # fmt: skip


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
    if results.get("cost"):
        lines += ["Cost per image-text pair (forward FLOPs of one pair):", ""]
        lines += _cost_table(results["cost"]) + [""]
    if results.get("gpu_layer"):
        lines += ["MoE layer by expert GEMM path (× = time / dense MLP):", ""]
        lines += _layer_table(results["gpu_layer"]) + [""]
    if results.get("gpu_train"):
        lines += ["Training steps on synthetic pairs:", ""] + _gpu_train_table(results["gpu_train"])
        lines += [""]
    if results.get("ddp"):
        lines += ["DDP:", ""] + _ddp_table(results["ddp"]) + [""]
    for row in results.get("gpu_checks", []):
        key = "sync_free" if row["check"] == "sync_free_step" else "captured"
        verdict = {True: "passed", False: f"FAILED ({row['error']})", None: "not run (CPU)"}
        lines.append(f"check {row['check']} {row['model']}: {verdict[row[key]]}")
    for t in results.get("targets", []):
        sign = {"max": "≤", "min": "≥", "within": "1 ±"}[t["kind"]]
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"target {t['target']}: {t['value']:.2f} ({sign} {t['bound']}) {verdict}")
    return "\n".join(lines)
