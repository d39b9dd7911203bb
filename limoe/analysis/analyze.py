"""``limoe-analyze``: route held-out pairs through a checkpoint and write its routing report
(figures and tables) into the run's ``routing/`` or ``cfg.out``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from limoe.analysis.report import write_report
from limoe.analysis.routing import collect_routing
from limoe.lit import read_history
from limoe.train import load_checkpoint


def analyze(cfg: DictConfig) -> dict[str, int]:
    """Write the report of ``cfg.ckpt``; returns, per layer, the number of image-only,
    text-only, shared and unused experts (``layer2/image_experts``, ...)."""
    module, datamodule, run_dir = load_checkpoint(cfg.ckpt, cfg.get("data"))
    out = Path(cfg.out) if cfg.get("out") else run_dir / "routing"
    dataset = datamodule.dataset(cfg.split)
    record = collect_routing(module.model, dataset, cfg.num_pairs, cfg.batch_size, cfg.device)
    history_path = Path(cfg.history) if cfg.get("history") else run_dir / "routing/history.jsonl"
    if cfg.get("history") and not history_path.is_file():
        raise ValueError(f"history={history_path} is not a file")
    history = read_history(history_path) if history_path.is_file() else None
    summaries = write_report(
        record, dataset, out, history, cfg.num_examples, cfg.threshold, cfg.min_share
    )
    print(f"limoe: routing of {len(record.pairs)} {cfg.split} pairs -> {out}")
    return {
        f"layer{layer}/{kind}_experts": s["specialised"][kind]
        for layer, s in summaries.items()
        for kind in s["specialised"]
    }
