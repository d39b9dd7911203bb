"""``limoe-benchmark``: CLIP_benchmark's own evaluation of a trained limoe model on data sets in
its layout gives the numbers ``limoe-eval`` gives on the same split; bad input ends in one
line. The data sets are written by ``limoe-data export --format clip_benchmark``."""

from __future__ import annotations

import csv
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from limoe import cli
from limoe.benchmark import accuracy, main, register, with_defaults
from limoe.data.export import main as limoe_data
from limoe.data.shapes import ShapesDataset
from limoe.eval import retrieval_metrics
from limoe.train import compose, train

pytest.importorskip("clip_benchmark")

# 48 test pairs: the first 48 of the shapes test split hold no two equal captions or images,
# so no query ties with its match and the two evaluations must agree on every one.
TEST_SIZE = 48
RUN = ["experiment=smoke", "data.train_size=64", "data.batch_size=16", "trainer.max_steps=4",
       f"data.test_size={TEST_SIZE}", "test=false", "callbacks.progress_bar=null",
       "trainer.enable_progress_bar=false"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A four-step run of the smoke LIMoE on shapes (checkpoints/last.ckpt)."""
    out = tmp_path_factory.mktemp("run")
    train(compose(RUN, out))
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    """The run's test split as a retrieval set and its ``shape`` task as a classification set."""
    root = tmp_path_factory.mktemp("cb")
    common = ["shapes", "--split", "test", "--size", str(TEST_SIZE), "--format", "clip_benchmark"]
    limoe_data(["export", *common, "--out", str(root / "pairs"), "--samples-per-shard", "20"])
    limoe_data(["export", *common, "--task", "shape", "--out", str(root / "shape")])
    return root


def benchmark(argv: list[str], out: Path) -> dict:
    main([*argv, "--no_amp", "--quiet", "--output", str(out)])
    return json.loads(out.read_text())


def test_the_split_has_no_ties():
    split = ShapesDataset("test", TEST_SIZE)
    assert len({split.caption(i) for i in range(TEST_SIZE)}) == TEST_SIZE
    assert len({split.image_uint8(i).tobytes() for i in range(TEST_SIZE)}) == TEST_SIZE


def test_clip_benchmark_numbers_equal_limoe_evals(run_dir, datasets, tmp_path, console):
    code, _, err = console(cli.evaluate, [f"ckpt={run_dir / 'checkpoints/last.ckpt'}",
                                          f"out={tmp_path}"], tmp_path)  # fmt: skip
    assert code == 0, err[-2000:]
    ours = json.loads((tmp_path / "metrics.json").read_text())
    pairs = ["--pretrained", str(run_dir), "--dataset", "wds/pairs", "--recall_k", "1", "5", "10",
             "--dataset_root", str(datasets / "pairs")]  # fmt: skip
    found = benchmark(pairs, tmp_path / "pairs.json")
    assert (found["model"], found["task"]) == ("limoe", "zeroshot_retrieval")  # task from layout
    theirs = found["metrics"]
    # CLIP_benchmark's text retrieval is image -> text; counted in pairs, every one equal
    for k in (1, 5, 10):
        for cb, limoe in (("text", "image_to_text"), ("image", "text_to_image")):
            assert round(theirs[f"{cb}_retrieval_recall@{k}"] * TEST_SIZE) == round(
                ours[f"test/{limoe}_R@{k}"] * TEST_SIZE
            ), (cb, k)
    shape = ["--pretrained", str(run_dir / "checkpoints/last.ckpt"), "--dataset", "wds/shape",
             "--dataset_root", str(datasets / "shape"), "--task", "zeroshot_classification"]  # fmt: skip
    theirs = benchmark(shape, tmp_path / "shape.json")["metrics"]
    for k in (1, 5):
        assert round(theirs[f"acc{k}"] * TEST_SIZE) == round(
            ours[f"test/shape_zeroshot_top{k}"] * TEST_SIZE
        ), k
    assert 0 <= theirs["mean_per_class_recall"] <= 1


def test_an_export_folder_gives_the_checkpoints_numbers(run_dir, datasets, tmp_path, console):
    code, _, err = console(cli.export, [f"ckpt={run_dir / 'checkpoints/last.ckpt'}",
                                        f"out={tmp_path / 'export'}"], tmp_path)  # fmt: skip
    assert code == 0, err
    pairs = ["--dataset", "wds/pairs", "--dataset_root", str(datasets / "pairs")]
    exported = benchmark(["--pretrained", str(tmp_path / "export"), *pairs], tmp_path / "e.json")
    trained = benchmark(["--pretrained", str(run_dir), *pairs], tmp_path / "r.json")
    assert exported["metrics"] == trained["metrics"]
    # CLIP_benchmark's table of results
    main(["build", str(tmp_path / "e.json"), str(tmp_path / "r.json"), "--output",
          str(tmp_path / "table.csv")])  # fmt: skip
    with (tmp_path / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["dataset"] for r in rows} == {"wds/pairs"}
    assert {float(r["text_retrieval_recall@5"]) for r in rows} == {
        trained["metrics"]["text_retrieval_recall@5"]
    }


def test_accuracy_is_clip_benchmarks_and_takes_numpy_2():
    """CLIP_benchmark 1.6.2's own function fails on numpy 2 (``float`` of a 1-element array);
    the mended one counts the same hits."""
    import numpy as np
    from clip_benchmark.metrics import zeroshot_classification

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    target = torch.tensor([1, 2, 0, 0])
    assert accuracy(logits, target, topk=(1, 2, 3)) == [2 / 4, 3 / 4, 4 / 4]
    original = importlib.reload(zeroshot_classification).accuracy  # as CLIP_benchmark ships it
    try:
        if int(np.__version__.split(".")[0]) >= 2:
            with pytest.raises(TypeError, match="0-dimensional"):
                original(logits, target, topk=(1,))
    finally:
        register()
    assert zeroshot_classification.accuracy is accuracy


def test_ties_are_broken_by_each_sort():
    """With duplicate captions a query ties with a caption that is not its own. open_clip (and
    ``limoe-eval``) rank by ``argsort``, CLIP_benchmark by ``topk``; each counts a hit when the
    query's own match comes first in its sort, so ties fall as each sort breaks them: the two
    lie between counting no tie and every tie as a hit, and differ by at most the queries that
    tie (here 0.61 and 0.75 of 200 queries, 100 of them tied)."""
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(200, 8), dim=-1)
    text = torch.nn.functional.normalize(image + 0.05 * torch.randn(200, 8), dim=-1)
    text[100:150] = text[50:100]  # 50 captions repeated
    ours = retrieval_metrics(image, text, 1.0)["image_to_text_R@1"]
    scores = image @ text.T
    theirs = (recall_at_k(scores, torch.eye(200, dtype=torch.bool), 1) > 0).float().mean().item()
    own = scores.diagonal()[:, None]
    tied = int(((scores == own).sum(1) > 1).sum())
    assert tied == 100
    no_tie_counted = ((scores >= own).sum(1) == 1).float().mean().item()
    every_tie_counted = ((scores > own).sum(1) == 0).float().mean().item()
    for found in (ours, theirs):
        assert no_tie_counted - 1e-6 <= found <= every_tie_counted + 1e-6
    assert abs(ours - theirs) <= tied / 200


def test_defaults_and_build():
    assert with_defaults(["--pretrained", "p"]) == ["eval", "--pretrained", "p", "--model_type",
                                                    "limoe", "--model", "limoe"]  # fmt: skip
    assert with_defaults(["eval", "--model=dense", "--model_type", "open_clip"]) == [
        "eval", "--model=dense", "--model_type", "open_clip"]  # fmt: skip
    assert with_defaults(["build", "a.json"]) == ["build", "a.json"]


def _layouts(root: Path) -> dict[str, Path]:
    """Data sets with one thing wrong each."""
    (root / "noclasses" / "test").mkdir(parents=True)
    (root / "noclasses" / "test" / "nshards.txt").write_text("1\n")
    (root / "noclasses" / "classnames.txt").write_text("\n")
    (root / "nosplit").mkdir()
    (root / "bad.ckpt").write_text("not a checkpoint")
    names = {
        "noclasses": "noclasses",
        "nosplit": "nosplit",
        "missing": "missing",
        "bad": "bad.ckpt",
    }
    return {key: root / name for key, name in names.items()}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "wds/x", "--dataset_root", "{missing}"], "missing (for wds/x) is not a folder"),
        (["--dataset", "wds/x", "--dataset_root", "{noclasses}"],
         "classnames.txt is missing or empty: wds/x has no classes to classify"),
        (["--dataset", "wds/x", "--dataset_root", "{nosplit}"],
         "test/nshards.txt does not exist: no test split"),
        (["--dataset", "cifar10"], "--dataset cifar10: limoe-benchmark reads local data sets"),
        (["--dataset", "wds/x", "--dataset_root", "{noclasses}", "--task", "linear_probe"],
         "CLIP_benchmark's linear probe runs on CUDA only"),
        (["--pretrained", "{bad}", "--dataset", "wds/x"],
         "bad.ckpt is not a limoe checkpoint: torch.load cannot read it"),
    ],
    ids=["no-folder", "no-classes", "no-split", "download", "probe-on-cpu", "not-limoe"],
)  # fmt: skip
def test_bad_input_ends_in_one_line(argv, message, run_dir, tmp_path, capsys):
    if "linear_probe" in argv and torch.cuda.is_available():
        pytest.skip("a GPU runs CLIP_benchmark's probe")
    paths = {k: str(v) for k, v in _layouts(tmp_path).items()}
    argv = [a.format(**paths) for a in argv]
    if "--pretrained" not in argv:
        argv = ["--pretrained", str(run_dir), *argv]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("limoe-benchmark: error: ") and message in err, err


def test_without_clip_benchmark_the_extra_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "clip_benchmark.cli", None)  # import fails as if absent
    with pytest.raises(SystemExit):
        main(["--pretrained", "x"])
    assert "pip install 'limoe-torch[benchmark]'" in capsys.readouterr().err
