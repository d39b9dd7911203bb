"""Write the routing analysis of a ``RoutingRecord`` into one directory: PNG figures plus the
numbers behind them (``summary.json`` and CSV tables). ``limoe-analyze`` and the notebooks
call ``write_report``; each figure also has its own function in ``limoe.analysis.plots``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from limoe.analysis import plots
from limoe.analysis.routing import (
    CONTENT_GROUPS,
    TEXT,
    PairRouting,
    RoutingRecord,
    content_groups,
    content_table,
    pair_routing,
    patch_experts,
    word_experts,
)
from limoe.moe.statistics import MODALITY_NAMES

KINDS = (*MODALITY_NAMES, "shared", "unused")


def token_text(tokenizer, token_id: int) -> str:
    """A token as it reads in a caption: the BPE piece without its end-of-word mark."""
    if token_id == tokenizer.sot_token_id:
        return "<start>"
    if token_id == tokenizer.eot_token_id:
        return "<end>"
    return tokenizer.decoder[token_id].replace("</w>", "")


def _write_csv(path: Path, header: Sequence[str], rows: list[Sequence]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _fmt(value) -> str | int:
    if value is None:
        return ""
    return value if isinstance(value, (int, str)) else f"{value:.6g}"


def summary_tables(summaries: dict[int, dict], out: Path) -> list[Path]:
    """``experts.csv`` (one row per layer and expert) and ``layers.csv`` (per layer and
    modality, with the layer's count of each expert kind)."""
    expert_rows, layer_rows = [], []
    for layer, s in summaries.items():
        for e in range(s["num_experts"]):
            expert_rows.append([layer, e, s["kind"][e]] + [
                _fmt(s[key][m][e]) for key in ("counts", "share", "modality_fraction")
                for m in MODALITY_NAMES
            ])  # fmt: skip
        for m in MODALITY_NAMES:
            layer_rows.append([layer, m] + [
                _fmt(s[key][m]) for key in
                ("tokens", "dropped", "entropy_local", "entropy_global", "top1_prob")
            ] + [s["specialised"][k] for k in KINDS])  # fmt: skip
    expert_header = ["layer", "expert", "kind"] + [
        f"{m}_{key}" for key in ("tokens", "share", "fraction") for m in MODALITY_NAMES
    ]
    layer_header = ["layer", "modality", "tokens", "dropped", "entropy_local",
                    "entropy_global", "top1_prob"] + [f"{k}_experts" for k in KINDS]  # fmt: skip
    return [
        _write_csv(out / "experts.csv", expert_header, expert_rows),
        _write_csv(out / "layers.csv", layer_header, layer_rows),
    ]


def _diagnostics(summary: dict, modality: str) -> list[str]:
    """``switched`` (empty at the first record) and the mean expert weight norms and the
    router's; empty for runs recorded before RoutingHistory kept them."""
    switched, norms = summary.get("switched"), summary.get("expert_norm") or {}
    return [
        "" if not switched else _fmt(switched[modality]),
        *("" if w not in norms else _fmt(sum(norms[w]) / len(norms[w])) for w in ("w1", "w2")),
        "" if "router" not in norms else _fmt(norms["router"]),
    ]


def history_table(history: list[dict], out: Path) -> Path:
    """``history.csv``: per validation step, layer and modality, the routing statistics."""
    rows = []
    for record in history:
        for layer, s in record["layers"].items():
            for m in MODALITY_NAMES:
                rows.append([record["step"], layer, m] + [
                    _fmt(s[key][m]) for key in
                    ("dropped", "entropy_local", "entropy_global", "top1_prob")
                ] + _diagnostics(s, m) + [s["specialised"][k] for k in KINDS])  # fmt: skip
    header = ["step", "layer", "modality", "dropped", "entropy_local", "entropy_global",
              "top1_prob", "switched", "expert_w1_norm", "expert_w2_norm", "router_norm"
              ] + [f"{k}_experts" for k in KINDS]  # fmt: skip
    return _write_csv(out / "history.csv", header, rows)


def content_tables(
    record: RoutingRecord, dataset
) -> tuple[dict[int, np.ndarray], list[str], list[int]]:
    """Per layer, ``content_table`` over the content groups present (in ``CONTENT_GROUPS``
    order), the groups and their token counts: the arguments of ``plot_content_routing``."""
    groups = content_groups(record, dataset)
    present = [g for g in CONTENT_GROUPS if g in set(groups)]
    counts = [groups.count(g) for g in present]
    tables = {layer: content_table(record, layer, groups, present) for layer in record.layers}
    return tables, present, counts


def content_report(record: RoutingRecord, dataset, out: Path) -> list[Path]:
    """``content.csv`` and ``content_routing.png``: which experts take shape / background
    patches and colour / shape / position ... words (needs an embedded dataset)."""
    tables, present, counts = content_tables(record, dataset)
    rows = [
        [layer, group, n, e, _fmt(float(table[g, e]))]
        for layer, table in tables.items()
        for g, (group, n) in enumerate(zip(present, counts))
        for e in range(table.shape[1])
    ]
    header = ["layer", "group", "tokens", "expert", "share"]
    figure = plots.plot_content_routing(tables, present, counts)
    return [
        _write_csv(out / "content.csv", header, rows),
        plots.save(figure, out / "content_routing.png"),
    ]


def patch_routing_figure(record: RoutingRecord, dataset, pairs: Sequence[int]) -> Figure:
    """``plot_patch_routing`` of the given pairs' images, one map per MoE layer."""
    images = np.stack([dataset.image_uint8(p) for p in pairs])
    patches = {layer: patch_experts(record, layer, pairs) for layer in record.layers}
    return plots.plot_patch_routing(images, patches, record.num_experts)


def word_routing_figure(record: RoutingRecord, dataset, pairs: Sequence[int]) -> Figure:
    """``plot_word_routing`` of the given pairs' captions, one row per MoE layer; a figure
    that says so where no caption token is routed (``model=clip_moe``: experts in the image
    tower only)."""
    if not bool((record.modality == TEXT).any()):
        return plots.plot_message(
            "Expert of each caption token (first choice)", plots.NO_ROUTED_CAPTION
        )
    captions, words = [], {layer: [] for layer in record.layers}
    for p in pairs:
        for layer in record.layers:
            token_ids, experts = word_experts(record, layer, p)
            words[layer].append(experts)
        captions.append([token_text(dataset.tokenizer, t) for t in token_ids])
    return plots.plot_word_routing(captions, words, record.num_experts)


def pair_routing_figure(
    record: RoutingRecord, dataset, layer: int, pair: int, image_share: Sequence[float | None]
) -> tuple[Figure, PairRouting]:
    """``plot_pair_routing`` of one pair at one layer, and the routing it draws."""
    routed = pair_routing(record, layer, pair, image_share)
    words = [token_text(dataset.tokenizer, t) for t in routed.token_ids]
    figure = plots.plot_pair_routing(dataset.image_uint8(pair), words, routed, record.num_experts)
    return figure, routed


def example_figures(record: RoutingRecord, dataset, out: Path, num_examples: int) -> list[Path]:
    """``patch_routing.png`` and ``word_routing.png`` for the first ``num_examples`` pairs."""
    pairs = record.pairs[:num_examples]
    return [
        plots.save(patch_routing_figure(record, dataset, pairs), out / "patch_routing.png"),
        plots.save(word_routing_figure(record, dataset, pairs), out / "word_routing.png"),
    ]


def write_report(
    record: RoutingRecord,
    dataset,
    out_dir: str | Path,
    history: list[dict] | None = None,
    num_examples: int = 6,
    threshold: float = 0.9,
    min_share: float = 0.01,
) -> dict[int, dict]:
    """Write every figure and table into ``out_dir``; returns the per-layer summaries."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = record.summaries(threshold, min_share)
    meta = {"num_pairs": len(record.pairs), "threshold": threshold, "min_share": min_share}
    layers = {str(k): v for k, v in summaries.items()}
    (out / "summary.json").write_text(json.dumps({**meta, "layers": layers}, indent=1) + "\n")
    summary_tables(summaries, out)
    figures = {
        "expert_shares.png": plots.plot_expert_shares(summaries),
        "image_fraction.png": plots.plot_image_fraction(summaries, threshold),
        "specialisation.png": plots.plot_specialisation(summaries),
        "routing_quality.png": plots.plot_routing_quality(summaries),
    }
    if history:
        history_table(history, out)
        figures["over_training.png"] = plots.plot_history(history)
    for name, figure in figures.items():
        plots.save(figure, out / name)
    if hasattr(dataset, "image_uint8") and num_examples > 0:
        example_figures(record, dataset, out, num_examples)
    if hasattr(dataset, "caption_roles"):
        content_report(record, dataset, out)
    return summaries
