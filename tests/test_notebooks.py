"""Every notebook runs top to bottom (papermill, with tiny parameters) and is committed
without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import torch

import limoe
from limoe.analysis.routing import collect_routing
from limoe.train import build_trainer, compose, load_checkpoint

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
SMOKE = ["experiment=smoke"]  # tiny model and data, a few steps
# experiment=smoke's sizes for a notebook that runs another experiment (paper_ablation)
SCENES_SMOKE = ["size=smoke", "data.train_size=256", "data.val_size=32", "data.test_size=32",
                "data.novel_size=32", "data.batch_size=16", "data.eval_batch_size=32",
                "data.partial_captions_from_step=2", "trainer.val_check_interval=3",
                "optim.warmup_steps=2"]  # fmt: skip
# A cell that runs longer fails the test instead of holding up the suite.
CELL_TIMEOUT_S = 300
PARAMETERS = {
    "01_quickstart.ipynb": {"overrides": SMOKE, "max_steps": 6, "num_shown": 2},
    "02_expert_modality_analysis.ipynb": {"train_overrides": SMOKE, "train_steps": 6,
                                          "num_pairs": 24, "num_examples": 2},
    "03_limoe_vs_clip.ipynb": {"overrides": SMOKE, "seeds": [0], "max_steps": 6,
                               "val_every": 3},
    "04_paper_ablation.ipynb": {"overrides": SCENES_SMOKE, "recipes": ["vmoe", "limoe"],
                                "max_steps": 6},
}  # fmt: skip


def test_every_notebook_has_tiny_parameters():
    assert NOTEBOOKS == sorted(PARAMETERS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    book = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), (
        f"{name} has outputs: clear them before committing (Kernel > Restart & Clear Output)"
    )
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    from papermill.translators import PythonTranslator

    declared = {p.name for p in PythonTranslator.inspect(tagged[0])}  # papermill's own parser
    assert {"out_dir", *PARAMETERS[name]} <= declared


@pytest.fixture
def run_notebook(tmp_path, monkeypatch):
    """Execute a notebook with its tiny parameters; returns (its out_dir, the executed book)."""
    # One thread per kernel: at these sizes a second one gains nothing and, on a busy 2-core
    # machine, OpenMP threads waiting on each other make a run ten times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return lambda name: _execute(name, tmp_path)


def _execute(name: str, tmp_path: Path) -> tuple[Path, dict]:
    import papermill

    out = tmp_path / "out"
    executed = papermill.execute_notebook(
        str(NOTEBOOK_DIR / name), str(tmp_path / name),
        parameters={**PARAMETERS[name], "out_dir": str(out)},
        cwd=str(tmp_path), kernel_name="python3", progress_bar=False,
        execution_timeout=CELL_TIMEOUT_S,
    )  # fmt: skip
    return out, executed


def image_outputs(executed) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in executed["cells"] if cell["cell_type"] == "code"
        for output in cell["outputs"]
    )  # fmt: skip


def test_quickstart_notebook(run_notebook):
    out, executed = run_notebook("01_quickstart.ipynb")
    assert image_outputs(executed) >= 3  # the data grid, the retrievals, the classified file
    # The metrics the notebook printed are the run's, recomputed from its checkpoint.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train/steps"] == 6
    printed = "".join(o.get("text", "") for c in executed["cells"] if c["cell_type"] == "code"
                      for o in c["outputs"])  # fmt: skip
    key = "test/image_to_text_R@1"
    assert f"{key:40s} {metrics[key]:.3f}" in printed
    module, datamodule, _ = load_checkpoint(out / "checkpoints" / "last.ckpt")
    cfg = compose([*SMOKE, "callbacks.progress_bar=null"], out / "eval")
    trainer = build_trainer(cfg, logger=False, enable_progress_bar=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    assert float(trainer.callback_metrics[key]) == pytest.approx(metrics[key], abs=1e-6)
    # The export loads back with the checkpoint's weights.
    exported, _, _ = limoe.create_model_and_transforms(out / "export")
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name


def widget_outputs(executed, code: str) -> int:
    """Widget views shown by the cells whose source holds ``code``."""
    return sum(
        "application/vnd.jupyter.widget-view+json" in output.get("data", {})
        for cell in executed["cells"] if cell["cell_type"] == "code" and code in cell["source"]
        for output in cell["outputs"]
    )  # fmt: skip


def test_expert_modality_analysis_notebook(run_notebook):
    out, executed = run_notebook("02_expert_modality_analysis.ipynb")
    summary = json.loads((out / "routing" / "summary.json").read_text())
    assert summary["num_pairs"] == 24
    assert (out / "routing" / "over_training.png").is_file()
    assert image_outputs(executed) >= 8  # every figure of the walk-through
    # The routing explorer shows as a widget (test_analysis drives its callbacks).
    assert widget_outputs(executed, "RoutingExplorer(") == 1
    # What the notebook wrote is the checkpoint's routing, collected again here.
    module, datamodule, _ = load_checkpoint(out / "run" / "checkpoints" / "last.ckpt")
    record = collect_routing(module.model, datamodule.dataset("test"), 24, progress=False)
    for layer, expected in record.summaries().items():
        assert summary["layers"][str(layer)]["specialised"] == expected["specialised"]
        assert summary["layers"][str(layer)]["counts"] == expected["counts"]


def test_expert_modality_analysis_notebook_on_experts_in_clips_image_tower(tmp_path, monkeypatch):
    """Notebook 02 on model=clip_moe: its experts see image tokens only, and every figure
    says so rather than break."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setitem(PARAMETERS["02_expert_modality_analysis.ipynb"], "train_overrides",
                        [*SMOKE, "model=clip_moe"])  # fmt: skip
    out, executed = _execute("02_expert_modality_analysis.ipynb", tmp_path)
    summary = json.loads((out / "routing" / "summary.json").read_text())
    for layer in summary["layers"].values():
        assert layer["specialised"]["text"] == layer["specialised"]["shared"] == 0
        assert sum(layer["counts"]["text"]) == 0 and sum(layer["counts"]["image"]) > 0
    printed = "".join(o.get("text", "") for c in executed["cells"] if c["cell_type"] == "code"
                      for o in c["outputs"])  # fmt: skip
    assert "MoELayer" in printed and widget_outputs(executed, "RoutingExplorer(") == 1


def test_limoe_vs_clip_notebook(run_notebook):
    out, executed = run_notebook("03_limoe_vs_clip.ipynb")
    table = (out / "comparison" / "comparison.md").read_text()
    assert image_outputs(executed) == 2
    # Each arm's cell of the table is its run's metric (one seed: no spread).
    row = next(
        line for line in table.splitlines() if line.startswith("| `test/image_to_text_R@1` |")
    )
    for arm in ("limoe", "dense", "clip"):
        (run,) = [json.loads(p.read_text()) for p in out.rglob("metrics.json")
                  if json.loads(p.read_text()).get("arm") == arm]  # fmt: skip
        assert f"{run['test/image_to_text_R@1']:.3f}" in row, (arm, row)


def test_paper_ablation_notebook(run_notebook):
    out, executed = run_notebook("04_paper_ablation.ipynb")
    for recipe in ("vmoe", "limoe"):
        metrics = json.loads((out / "runs" / f"{recipe}_seed0" / "metrics.json").read_text())
        assert metrics["arm"] == recipe and metrics["train/steps"] == 6
        assert "routing/text_busiest_share" in metrics
    table = (out / "comparison" / "comparison.md").read_text()
    assert "| metric | limoe (n=1) | vmoe (n=1) |" in table
    assert image_outputs(executed) == 2  # expert shares, collapse
