"""CLIP_benchmark on every run of a sweep: ``limoe-benchmark`` on each data set given, for each
run folder under the sweep, its JSON results kept in ``RUN/clip_benchmark/NAME.json`` and
their metrics added to the run's ``metrics.json`` as ``clip_benchmark/NAME/METRIC``, so that
``limoe-compare`` tables them by arm (mean ± std over seeds) beside the run's own metrics.

    python scripts/benchmark_runs.py logs/cb_openclipart/multiruns/<time> \\
        openclipart=data/cb/openclipart tuxpaint=data/cb/tuxpaint \\
        tuxpaint_category=data/cb/tuxpaint_category fashion_mnist=data/cb/fashion_mnist
    limoe-compare logs/cb_openclipart/multiruns/<time> --out docs/results/clip_benchmark

Each data set is a folder in CLIP_benchmark's layout (``limoe-data export --format
clip_benchmark``); the task follows from it. The model runs in float32 (``--no_amp``), as
``limoe-eval`` on a CPU; retrieval reports recall at 1, 5 and 10. The split is ``test``, or a
set's only split (``novel``). A result already there is kept (CLIP_benchmark's
``--skip_existing``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from limoe.benchmark import main as limoe_benchmark
from limoe.runs import read_metrics, write_metrics


def run_folders(sweep: Path) -> list[Path]:
    return sorted(p.parent.parent for p in sweep.rglob("checkpoints/last.ckpt"))


def split_of(root: Path) -> str:
    """The split a data set is evaluated on: ``test``, or its only split (``limoe-data export
    scenes --split novel`` writes ``novel/``)."""
    splits = sorted(p.parent.name for p in root.glob("*/nshards.txt"))
    return splits[0] if len(splits) == 1 and not (root / "test").is_dir() else "test"


def benchmark_run(run: Path, datasets: dict[str, Path]) -> dict[str, float]:
    """CLIP_benchmark's metrics of one run on each data set, by ``clip_benchmark/NAME/``."""
    record = read_metrics(run / "metrics.json")
    found = {}
    for name, root in datasets.items():
        output = run / "clip_benchmark" / f"{name}.json"
        output.parent.mkdir(exist_ok=True)
        limoe_benchmark(["--pretrained", str(run), "--model", record.arm or "limoe",
                         "--dataset", f"wds/{name}", "--dataset_root", str(root),
                         "--split", split_of(root), "--recall_k", "1", "5", "10", "--no_amp",
                         "--quiet", "--skip_existing", "--output", str(output)])  # fmt: skip
        metrics = json.loads(output.read_text())["metrics"]
        found.update({f"clip_benchmark/{name}/{k}": float(v) for k, v in metrics.items()})
    write_metrics(run / "metrics.json", {**record.metrics, **found}, record.arm, record.config)
    return found


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        sys.exit(__doc__)
    sweep = Path(argv[0])
    datasets = {name: Path(root) for name, root in (a.split("=", 1) for a in argv[1:])}
    runs = run_folders(sweep)
    if not runs:
        sys.exit(f"no run folder with checkpoints/last.ckpt under {sweep}")
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run}", flush=True)
        benchmark_run(run, datasets)


if __name__ == "__main__":
    main(sys.argv[1:])
