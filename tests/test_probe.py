"""limoe's linear probe against CLIP_benchmark's own (``clip_benchmark.metrics.linear_probe``),
run on the CPU with its ``.cuda()`` calls made no-ops, and against numbers by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from limoe import cli
from limoe.data.shapes import ShapesDataset
from limoe.eval.probe import (
    FIRST_POINTS,
    WEIGHT_DECAYS,
    ProbeOptions,
    linear_probe,
    mean_per_class_recall,
    search_weight_decay,
    train_probe,
)
from limoe.factory import create_model_and_transforms

OPTIONS = ProbeOptions(lr=0.1, epochs=3, batch_size=16, seed=3)


def blobs(
    n: int, classes: int = 4, dim: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised features around one centre per class, noisy enough that probes disagree."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.arange(n) % classes
    features = centres[labels] + 1.5 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(features, dim=-1), labels


@pytest.fixture
def clip_benchmark_on_cpu(monkeypatch):
    """CLIP_benchmark's probe module, its ``.cuda()`` calls returning what they are given and
    its accuracy mended for numpy 2 (as ``limoe-benchmark`` mends it)."""
    if torch.cuda.is_available():
        pytest.skip("compared on the CPU")
    module = pytest.importorskip("clip_benchmark.metrics.linear_probe")
    from limoe.benchmark import register

    register()  # its accuracy, mended for numpy 2
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    return module


def their_loader(cb, features, labels, batch_size):
    return DataLoader(cb.FeatureDataset(features, labels), batch_size=batch_size, shuffle=True)


def test_train_probe_is_clip_benchmarks_train_bit_for_bit(clip_benchmark_on_cpu):
    cb = clip_benchmark_on_cpu
    features, labels = blobs(100)
    ours = train_probe(features, labels, 4, 1e-3, OPTIONS)
    loader = their_loader(cb, features, labels, OPTIONS.batch_size)
    theirs = cb.train(loader, 8, 4, 1e-3, OPTIONS.lr, OPTIONS.epochs, False, "cpu", OPTIONS.seed)
    assert torch.equal(ours.weight, theirs.module.weight)
    assert torch.equal(ours.bias, theirs.module.bias)


def test_the_weight_decay_search_visits_clip_benchmarks_points(clip_benchmark_on_cpu):
    cb = clip_benchmark_on_cpu
    train, val = blobs(80, seed=1), blobs(40, seed=2)
    ours = search_weight_decay(train, val, 4, OPTIONS)
    # CLIP_benchmark's search, as its ``evaluate`` runs it
    args = (their_loader(cb, *train, 16), their_loader(cb, *val, 16), 8, 4, OPTIONS.lr,
            OPTIONS.epochs, False, "cpu", False, OPTIONS.seed)  # fmt: skip
    wd_list = np.logspace(-6, 2, num=97).tolist()
    wd_list_init = np.logspace(-6, 2, num=7).tolist()
    init = [i for i, val in enumerate(wd_list) if val in wd_list_init]
    peak = cb.find_peak(wd_list, init, *args)
    span = 8
    while span > 0:
        left, right = max(peak - span, 0), min(peak + span, len(wd_list) - 1)
        peak = cb.find_peak(wd_list, [left, peak, right], *args)
        span //= 2
    assert ours == wd_list[peak]
    assert FIRST_POINTS == init and WEIGHT_DECAYS == wd_list


def test_metrics_by_hand():
    predictions = torch.tensor([0, 0, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    # class 0: 1 of 2, class 1: 1 of 2, class 2: 2 of 2 -> (0.5 + 0.5 + 1) / 3
    assert mean_per_class_recall(predictions, labels) == pytest.approx(2 / 3)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert mean_per_class_recall(predictions, labels) == pytest.approx(
        sklearn.balanced_accuracy_score(labels, predictions)
    )


def test_linear_probe_learns_separable_classes_and_reports_its_weight_decay():
    centres = torch.eye(6) * 4
    labels = torch.arange(300) % 6
    g = torch.Generator().manual_seed(0)
    features = centres[labels] + 0.3 * torch.randn(300, 6, generator=g)
    train, test = (features[:200], labels[:200]), (features[200:], labels[200:])
    found = linear_probe(train, test, ProbeOptions(epochs=5))
    assert found["acc1"] == found["acc5"] == found["mean_per_class_recall"] == 1.0
    assert found["weight_decay"] == 0.0
    searched = linear_probe(train, test, ProbeOptions(epochs=2, val_proportion=0.25))
    assert searched["weight_decay"] in WEIGHT_DECAYS and searched["acc1"] > 0.9
    few = linear_probe((features[:200:2], labels[:200:2] % 3), (features[200:], labels[200:] % 3),
                       ProbeOptions(epochs=2))  # fmt: skip
    assert math.isnan(few["acc5"])  # under 6 classes, as CLIP_benchmark


@pytest.mark.parametrize("bad", [{"lr": 0}, {"epochs": 0}, {"val_proportion": 1.0}])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match="probe"):
        ProbeOptions(**bad)


# --- limoe-eval probe=... on a trained model ---------------------------------------------------

RUN = ["experiment=smoke", "data.train_size=64", "data.batch_size=16", "trainer.max_steps=2",
       "test=false", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from limoe.train import compose, train

    out = tmp_path_factory.mktemp("run")
    train(compose(RUN, out))
    return out / "checkpoints" / "last.ckpt"


def evaluate(console, ckpt: Path, out: Path, *probe: str) -> dict:
    out.mkdir(exist_ok=True)
    code, stdout, err = console(cli.evaluate, [f"ckpt={ckpt}", f"out={out}", *probe], out)
    assert code == 0, err[-2000:]
    assert "linear probe" in stdout
    return json.loads((out / "metrics.json").read_text())


def test_limoe_eval_probes_a_task_on_features_it_caches(ckpt, tmp_path, console):
    metrics = evaluate(console, ckpt, tmp_path, "probe.task=shape", "probe.train_size=40",
                       "probe.epochs=2")  # fmt: skip
    cache = {
        split: torch.load(tmp_path / "probe" / f"shape_{split}.pt") for split in ("train", "test")
    }
    # The features are the model's own, of the train split's first 40 images and the test split
    model, _, _ = create_model_and_transforms(ckpt)
    column = ShapesDataset.task_names.index("shape")
    for split, size in (("train", 40), ("test", 64)):
        images = ShapesDataset(split, size, return_labels=True)
        batch = torch.stack([images[i][0] for i in range(size)])
        with torch.no_grad():
            expected = model.encode_image(batch, normalize=True)
        torch.testing.assert_close(cache[split]["features"], expected, atol=1e-5, rtol=1e-5)
        assert cache[split]["labels"].tolist() == [
            int(images.labels(i)[column]) for i in range(size)
        ]
    train, test = ((cache[s]["features"], cache[s]["labels"]) for s in ("train", "test"))
    found = linear_probe(train, test, ProbeOptions(epochs=2))
    assert metrics["probe/shape_acc1"] == pytest.approx(found["acc1"])
    assert metrics["probe/shape_weight_decay"] == 0.0
    assert "test/image_to_text_R@1" in metrics  # beside the test metrics
    # Other probe options reuse the features; another task computes its own.
    stamp = (tmp_path / "probe" / "shape_train.pt").stat().st_mtime_ns
    again = evaluate(console, ckpt, tmp_path, "probe.task=shape", "probe.train_size=40",
                     "probe.epochs=2", "probe.lr=0.01")  # fmt: skip
    assert (tmp_path / "probe" / "shape_train.pt").stat().st_mtime_ns == stamp
    assert again["probe/shape_acc1"] == pytest.approx(
        linear_probe(train, test, ProbeOptions(epochs=2, lr=0.01))["acc1"]
    )


def _tree(root: Path, classes: dict[str, list[tuple[int, int, int]]]) -> Path:
    for name, colours in classes.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (32, 32), colour).save(root / name / f"{i}.png")
    return root


def test_limoe_eval_probes_imagefolder_trees(ckpt, tmp_path, console):
    red, blue = [(200 + i, 20, 20) for i in range(6)], [(20, 20, 200 + i) for i in range(6)]
    _tree(tmp_path / "colours" / "train", {"blue": blue[:4], "red": red[:4]})
    _tree(tmp_path / "colours" / "test", {"blue": blue[4:], "red": red[4:]})
    probe = [f"probe.train={tmp_path / 'colours/train'}", f"probe.test={tmp_path / 'colours/test'}"]
    metrics = evaluate(console, ckpt, tmp_path / "out", *probe)
    assert metrics["probe/colours_acc1"] == 1.0  # red against blue
    assert math.isnan(metrics["probe/colours_acc5"])
    labels = torch.load(tmp_path / "out" / "probe" / "colours_test.pt")["labels"]
    assert labels.tolist() == [0, 0, 1, 1]  # blue, red: the folders' sorted order


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        (["probe.task=first_shape"], "probe.task=first_shape: this data's tasks are colour, shape"),
        (["probe.train={root}/a"], "probe: give probe.train and probe.test"),
        (["probe.train={root}/a", "probe.test={root}/b"],
         "probe.train and probe.test must hold the same class folders"),
        (["probe.train={root}/a", "probe.test={root}/none"], "probe.test.root="),
    ],
)  # fmt: skip
def test_bad_probes_end_in_one_line(probe, message, ckpt, tmp_path, console):
    _tree(tmp_path / "a", {"x": [(0, 0, 0)], "y": [(9, 9, 9)]})
    _tree(tmp_path / "b", {"x": [(0, 0, 0)], "z": [(9, 9, 9)]})
    argv = [f"ckpt={ckpt}", f"out={tmp_path}", *(p.format(root=tmp_path) for p in probe)]
    code, _, err = console(cli.evaluate, argv, tmp_path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
