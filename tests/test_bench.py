"""limoe-bench: fair interleaved timing, the grid, the JSON schema of a tiny run (never the
timings themselves), the targets and table read off rows built by hand, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from limoe import cli
from limoe.bench import (
    check_targets,
    format_table,
    layer_cases,
    run_layer_bench,
    time_interleaved,
)
from limoe.bench.run import run_bench
from limoe.bench.train import round_ratios, run_train_bench
from limoe.cli import flags_to_overrides
from limoe.train import compose

BIN = Path(sys.executable).parent
TINY_LAYER = [
    "layer.num_experts=[1,4]",
    "layer.top_k=[1,2]",
    "layer.capacity_factor=[1.0,null]",
    "layer.tokens=[64]",
    "layer.dim=[16]",
    "layer.warmup=1",
    "layer.repeats=2",
]
TINY_TRAIN = [
    "train.overrides=['experiment=smoke','data.val_size=16']",
    "train.batch_size=8",
    "train.warmup=1",
    "train.repeats=2",
    "train.rounds=2",
]


def test_time_interleaved_calls_round_robin_after_warmup():
    calls, rounds = [], []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_interleaved(fns, warmup=1, repeats=3, on_round=lambda: rounds.append(1))
    assert calls == ["a", "b"] * 4
    assert len(rounds) == 4
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_interleaved(fns, warmup=0, repeats=0)


def test_layer_rows_from_hand_set_times(monkeypatch):
    """Timings replaced by hand-set ones: 64 tokens; dense takes 2, 4, 3 s (median 3), the
    sorted layer 1, 2, 9 s (median 2): 32 tokens/s, 2/3 of dense's time. With 4 experts at
    capacity factor 0.25 (C = 4 slots each) and at least 4 choices each at this seed, 48 of
    the 64 top-1 choices are dropped."""
    hand = {"dense": [2.0, 4.0, 3.0], "sorted": [1.0, 2.0, 9.0]}
    monkeypatch.setattr("limoe.bench.layer.time_interleaved",
                        lambda calls, *args, **kwargs: {mode: hand[mode] for mode in calls})  # fmt: skip
    cases = layer_cases([4], [1], [0.25], [64], [16])
    rows = run_layer_bench(cases, ["dense", "sorted"], ["fwd"], progress=False)
    dense, moe = rows
    assert (dense["median_s"], moe["median_s"]) == (3.0, 2.0)
    assert moe["tokens_per_s"] == 32.0 and moe["time_vs_dense"] == pytest.approx(2 / 3)
    assert dense["time_vs_dense"] == 1.0 and dense["dropped_fraction"] is None
    assert moe["dropped_fraction"] == 48 / 64


def test_layer_cases_leave_out_top_k_above_num_experts():
    cases = layer_cases([1, 8, 32], [1, 2], [1.0, None], [16384], [256])
    assert len(cases) == (1 + 2 + 2) * 2  # E=1 has no top-2
    assert all(c.top_k <= c.num_experts and c.hidden == 1024 for c in cases)


TINY_DATA = [
    "data.image_sizes=[16]", "data.num_workers=[0,1]", "data.batch_size=4", "data.batches=2",
    "data.feed.file_size=16", "data.feed.warmup=1", "data.feed.steps=2", "data.feed.rounds=1",
    "data.feed.overrides=['size=smoke','data.batch_size=4','data.image_size=16']",
]  # fmt: skip


def _check_data_suite(results: dict, printed: str) -> None:
    loaders = results["loaders"]
    assert [(r["format"], r["num_workers"]) for r in loaders] == [
        ("csv", 0), ("csv", 1), ("webdataset", 0), ("webdataset", 1)
    ]  # fmt: skip
    for r in loaders:
        assert r["image_size"] == 16 and r["batch_size"] == 4 and r["pairs_per_s"] > 0
        per_worker = r["pairs_per_s"] / max(1, r["num_workers"])
        assert r["pairs_per_s_per_worker"] == pytest.approx(per_worker)
    (feed,) = results["feed"]
    assert feed["model"] == "limoe" and feed["batch_size"] == 4 and feed["image_size"] == 16
    assert feed["num_workers"] >= 1  # data=csv's default: one per spare core, at least one
    ratio = feed["files_pairs_per_s"] / feed["memory_pairs_per_s"]
    assert feed["files_vs_memory"] == pytest.approx(ratio)
    target = results["targets"][-1]
    assert target["target"].startswith("training pairs/s fed from files")
    assert target["value"] == feed["files_vs_memory"] and target["bound"] == 0.9
    assert "| csv | 16 | 1 | 4 |" in printed and "| limoe | 16 → 16 | " in printed


def _bench_cfg(tmp_path: Path, overrides: list[str]):
    return compose(
        [*overrides, f"out={tmp_path / 'bench.json'}", "progress=false"], tmp_path, "bench"
    )


def test_round_ratios_compare_the_calls_of_one_round():
    # Round 2 is a slow spell for both (x2): the ratio of that round is still 0.5.
    assert round_ratios([1.0, 2.0, 1.0], [2.0, 4.0, 1.25]) == [0.5, 0.5, 0.8]
    with pytest.raises(ValueError):
        round_ratios([1.0], [1.0, 2.0])


def test_train_bench_ratio_is_the_median_over_rounds_of_the_round_medians():
    """Fits that report known step times: dense takes 1 s a step; limoe 2 s in round one, then
    a slow spell doubles both in round two, then 1.25 s. Ratios 0.5, 0.5, 0.8: median 0.5."""
    rounds = {"dense": [[9.0, 1.0, 1.0, 1.0], [9.0, 2.0, 2.0, 2.0], [9.0, 1.0, 1.0, 1.0]],
              "limoe": [[9.0, 2.0, 2.0, 2.5], [9.0, 4.0, 4.0, 4.0], [9.0, 1.0, 1.25, 1.5]]}  # fmt: skip
    asked = []

    def fit(name):
        def steps(n):
            asked.append((name, n))
            return rounds[name].pop(0)

        return steps

    rows = run_train_bench({"dense": fit("dense"), "limoe": fit("limoe")}, 4, {"dense": 10,
                           "limoe": 30}, warmup=1, repeats=3, rounds=3, progress=False)  # fmt: skip
    assert asked == [("dense", 5), ("limoe", 5)] * 3  # warmup + repeats + the clock's start
    dense, limoe = rows
    assert limoe["round_median_s"] == [2.0, 4.0, 1.25] and dense["round_median_s"] == [1, 2, 1]
    assert limoe["pairs_per_s_vs_dense"] == 0.5 and dense["pairs_per_s_vs_dense"] == 1.0
    assert limoe["median_s"] == 2.0 and limoe["pairs_per_s"] == 2.0  # 4 pairs / 2 s
    assert limoe["times_s"] == [2.0, 2.0, 2.5, 4.0, 4.0, 4.0, 1.0, 1.25, 1.5]


def test_tiny_benchmark_writes_the_json_schema(tmp_path, capsys):
    results = run_bench(_bench_cfg(tmp_path, TINY_LAYER + TINY_TRAIN + TINY_DATA))
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(results))
    assert set(results) == {"machine", "dtype", "config", "layer", "train", "loaders", "feed",
                            "cost", "gpu_layer", "gpu_train", "ddp", "gpu_checks", "targets"}  # fmt: skip
    assert results["cost"] == results["gpu_layer"] == results["gpu_train"] == results["ddp"] == []
    assert results["gpu_checks"] == []
    assert results["dtype"] == "float32" and results["machine"]["device"] == "cpu"
    layer = results["layer"]
    # 6 cases (E=1: 2, E=4: 4) x 3 modes x 2 passes.
    assert len(layer) == 6 * 3 * 2
    for row in layer:  # the arithmetic of the rows: test_layer_rows_from_hand_set_times
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        if row["mode"] == "dense":
            assert row["dropped_fraction"] is None
        elif row["capacity_factor"] is None or row["num_experts"] == 1:
            assert row["dropped_fraction"] == 0.0
        else:
            assert 0.0 <= row["dropped_fraction"] < 1.0
    train = {r["model"]: r for r in results["train"]}
    assert set(train) == {"limoe", "dense", "clip"}
    assert train["dense"]["pairs_per_s_vs_dense"] == 1.0
    for r in train.values():  # 2 rounds of 2 timed steps, each from Lightning's loop
        assert r["batch_size"] == 8 and len(r["times_s"]) == 4 and len(r["round_median_s"]) == 2
        assert all(t > 0 for t in r["times_s"])
    assert train["limoe"]["params"] > train["dense"]["params"]  # the experts
    # The tiny shape is not the issue's, so only the training and feed targets apply.
    assert [t["target"] for t in results["targets"]] == [
        "limoe pairs/s / dense pairs/s", "training pairs/s fed from files / from memory"
    ]  # fmt: skip
    printed = capsys.readouterr().out
    _check_data_suite(results, printed)
    assert "| 4 | 2 | dropless | 64 | 16 | fwd_bwd |" in printed
    assert "| limoe | 8 |" in printed


def _layer_row(experts: int, mode: str, seconds: float, dense: float) -> dict:
    return {"num_experts": experts, "top_k": 1, "capacity_factor": None, "tokens": 16384,
            "dim": 256, "hidden": 1024, "mode": mode, "pass": "fwd_bwd", "median_s": seconds,
            "times_s": [seconds], "tokens_per_s": 16384 / seconds,
            "time_vs_dense": seconds / dense, "dropped_fraction": None}  # fmt: skip


def test_targets_and_table_from_rows_built_by_hand():
    layer = [
        _layer_row(8, "dense", 0.4, 0.4), _layer_row(8, "sorted", 0.44, 0.4),
        _layer_row(32, "dense", 0.4, 0.4), _layer_row(32, "sorted", 0.52, 0.4),
        _layer_row(32, "onehot", 1.56, 0.4),
    ]  # fmt: skip
    train = [{"model": "limoe", "batch_size": 128, "median_s": 0.25, "times_s": [0.25],
              "pairs_per_s": 512.0, "pairs_per_s_vs_dense": 0.8}]  # fmt: skip
    cost = [{"model": "limoe_b32", "against": "clip_b32", "flops_vs_against": 1.12},
            {"model": "limoe_l16", "against": "clip_l14", "flops_vs_against": 0.95},
            {"model": "dense_b32", "against": "clip_b32", "flops_vs_against": 1.12},
            {"model": "clip_b32", "against": None, "flops_vs_against": None}]  # fmt: skip
    gpu_layer = [{**_layer_row(8, "dense", 0.4, 0.4), "pass": "fwd_bwd"},
                 _layer_row(8, "sorted-grouped", 0.45, 0.4), _layer_row(8, "sorted-loop", 0.6, 0.4),
                 _layer_row(32, "sorted-grouped", 0.8, 0.4)]  # fmt: skip
    gpu_train = [{"model": "limoe", "pairs_per_s_vs_dense": None},
                 {"model": "limoe_b32", "pairs_per_s_vs_dense": 0.8}]  # fmt: skip
    results = {"layer": layer, "train": train, "cost": cost, "gpu_layer": gpu_layer,
               "gpu_train": gpu_train}  # fmt: skip
    targets = {t["target"]: (round(t["value"], 6), t["met"]) for t in check_targets(results)}
    assert targets == {
        "sorted fwd+bwd time / dense, E=8": (1.1, True),
        "sorted fwd+bwd time / dense, E=32": (1.3, False),
        "one-hot fwd+bwd time / sorted, E=32": (3.0, False),
        "limoe pairs/s / dense pairs/s": (0.8, False),
        # within 10 % either way; only the LIMoE presets are held to it
        "limoe_b32 FLOPs per pair / clip_b32": (1.12, False),
        "limoe_l16 FLOPs per pair / clip_l14": (0.95, True),
        # the faster GEMM path at E=8: 0.4 / 0.45 of the dense MLP's time
        "bf16 MoE fwd+bwd throughput / dense MLP, E=8": (round(0.4 / 0.45, 6), True),
        "limoe_b32 pairs/s / dense_b32 pairs/s": (0.8, False),
    }
    table = format_table({"layer": layer, "train": train, "targets": check_targets(results)})
    assert (
        "| 32 | 1 | dropless | 16384 | 256 | fwd_bwd | 400.0 | 520.0 (1.30×) | 1560.0 (3.90×) |"
        in table
    )
    assert "| 8 | 1 | dropless | 16384 | 256 | fwd_bwd | 400.0 | 440.0 (1.10×) | — |" in table
    assert "| limoe | 128 | 250.0 | 512 | 0.80 |" in table
    assert "target sorted fwd+bwd time / dense, E=32: 1.30 (≤ 1.25) MISSED" in table


def test_device_flag_reads_as_an_override():
    argv = ["--device", "cuda", "--dtype=bfloat16", "suite=layer", "-m"]
    assert flags_to_overrides(argv) == ["device=cuda", "dtype=bfloat16", "suite=layer", "-m"]


def test_limoe_bench_console_script(tmp_path):
    cmd = [str(BIN / "limoe-bench"), "suite=layer", *TINY_LAYER, "layer.num_experts=[2]",
           "layer.top_k=[1]", "layer.capacity_factor=[null]", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["layer"]
    assert [(r["mode"], r["pass"]) for r in rows] == [
        (m, p) for p in ("fwd", "fwd_bwd") for m in ("dense", "sorted", "onehot")
    ]
    assert "| 2 | 1 | dropless | 64 | 16 | fwd |" in result.stdout


@pytest.mark.parametrize(
    "override, message",
    [("suite=tpu", "suite must be one of"), ("dtype=float16", "dtype must be float32"),
     ("layer.modes=[dense,fast]", "layer mode must be one of")],
)  # fmt: skip
def test_bad_bench_config_fails_with_one_line(override, message, tmp_path, console):
    argv = [*TINY_LAYER, "suite=layer", override, f"hydra.run.dir={tmp_path}"]
    code, _, err = console(cli.bench, argv, tmp_path)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("limoe: error: ")
    assert message in err


# The GPU check's dry run: the real preset names, shrunk to a few seconds on a CPU.
SHRUNK = ['data=shapes', 'data.image_size=16', 'data.context_length=8', 'data.val_size=16',
          'model.width=16', 'model.depth=2', 'model.num_heads=2', 'model.patch_size=8',
          'model.embed_dim=16']  # fmt: skip
TINY_GPU = [
    "gpu.layer.tokens=[64]", "gpu.layer.dim=[16]", "gpu.layer.num_experts=[8]",
    "gpu.layer.warmup=1", "gpu.layer.repeats=2", "gpu.layer.compile=[false]",
    "gpu.train.models.limoe=['experiment=smoke']",
    f"gpu.train.models.limoe_b32={[*SHRUNK, 'model.moe_layers=[1]']}",
    f"gpu.train.models.dense_b32={SHRUNK}",
    "gpu.train.batch_size=8", "gpu.train.warmup=1", "gpu.train.steps=2",
]  # fmt: skip


def test_gpu_check_dry_run_on_cpu_writes_every_part(tmp_path, capsys):
    ddp = ["gpu.ddp.processes=2", "gpu.ddp.model=limoe", "gpu.ddp.steps=2",
           "gpu.ddp.overrides=['experiment=smoke','data.batch_size=8','data.val_size=16',"
           "'data.test_size=16','data.novel_size=16']"]  # fmt: skip
    results = run_bench(_bench_cfg(tmp_path, ["suite=gpu", *TINY_GPU, *ddp]))
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(results))
    layer = results["gpu_layer"]
    # 2 capacities x 2 passes x (dense + one row per GEMM path)
    modes = ["dense", "sorted-grouped", "sorted-loop", "sorted-padded"]
    assert sorted({r["mode"] for r in layer}) == sorted(modes)
    assert len(layer) == 2 * 2 * 4
    train = {r["model"]: r for r in results["gpu_train"]}
    assert list(train) == ["limoe", "limoe_b32", "dense_b32"]
    for r in train.values():
        assert r["steps"] == 2 and r["batch_size"] == 8 and r["losses_finite"]
        assert r["pairs_per_s"] == pytest.approx(8 * 2 / r["seconds"])
        assert r["peak_memory_gib"] is None  # measured on GPUs only
    ratio = train["limoe_b32"]["pairs_per_s"] / train["dense_b32"]["pairs_per_s"]
    assert train["limoe_b32"]["pairs_per_s_vs_dense"] == pytest.approx(ratio)
    assert train["limoe"]["pairs_per_s_vs_dense"] is None  # no model=dense among them
    (ddp_row,) = results["ddp"]
    assert ddp_row["processes"] == 2 and ddp_row["finite"] and ddp_row["pairs_per_s"] > 0
    assert [t["target"] for t in results["targets"]] == [
        "bf16 MoE fwd+bwd throughput / dense MLP, E=8", "limoe_b32 pairs/s / dense_b32 pairs/s"
    ]  # fmt: skip
    # The sync and graph checks need CUDA: on a CPU they are listed, not run.
    checks = [(r["check"], r["model"]) for r in results["gpu_checks"]]
    assert checks == [("sync_free_step", "limoe"), ("sync_free_step", "limoe_b32"),
                      ("sync_free_step", "dense_b32"), ("cuda_graph_layer", "MoELayer E=8")]  # fmt: skip
    assert all(r.get("sync_free", r.get("captured")) is None for r in results["gpu_checks"])
    printed = capsys.readouterr().out
    assert "| 8 | 1 | dropless | 64 | 16 | fwd_bwd |" in printed
    assert "| limoe_b32 | 8 | 2 |" in printed and "| 2 | limoe | 2 |" in printed
    assert "check sync_free_step limoe_b32: not run (CPU)" in printed


def test_gpu_layer_rows_compiled_are_timed_against_the_compiled_dense_mlp():
    """``gpu.layer.compile``: the compiled rows (the loop, whose slices stay out of the graph,
    on a CPU in float32) carry ``-compiled``, their ratio is to the compiled dense MLP of the
    same case, and they make a target of their own."""
    from limoe.bench.gpu import run_gemm_layer_bench
    from limoe.bench.layer import layer_cases
    from limoe.bench.report import check_targets

    cases = layer_cases([8], [1], [None], [64], [16], 4.0)
    layer_kwargs = dict(cases=cases, passes=["fwd_bwd"], warmup=1, repeats=2, progress=False)
    rows = run_gemm_layer_bench(["loop"], layer_kwargs, {}, compiled=[False, True])
    assert [r["mode"] for r in rows] == ["dense", "sorted-loop", "dense-compiled",
                                         "sorted-loop-compiled"]  # fmt: skip
    for dense, moe in (rows[:2], rows[2:]):
        assert moe["time_vs_dense"] == pytest.approx(moe["median_s"] / dense["median_s"])
    targets = {t["target"]: t for t in check_targets({"gpu_layer": rows})}
    compiled = targets["compiled bf16 MoE fwd+bwd throughput / compiled dense MLP, E=8"]
    assert compiled["value"] == pytest.approx(1 / rows[3]["time_vs_dense"])
    assert compiled["bound"] == 0.9


def test_cost_suite_counts_one_full_pair_and_the_ratio_to_its_baseline(tmp_path):
    from limoe.bench.cost import full_caption
    from limoe.bench.gpu import synthetic_pairs
    from limoe.factory import create_model
    from limoe.models import model_cost

    against = ["~cost.against", "+cost.against={limoe: clip, dense: clip}",
               "cost.overrides=['experiment=smoke']"]  # fmt: skip
    rows = {
        r["model"]: r for r in run_bench(_bench_cfg(tmp_path, ["suite=cost", *against]))["cost"]
    }
    assert list(rows) == ["limoe", "dense", "clip"]
    # The same count by hand: the dropless LIMoE on a random image and a caption filling all
    # 24 text positions (start token, words, end-of-text last).
    tokens = full_caption(1, 24, 49408)
    assert tokens[0, 0] == 49406 and tokens[0, -1] == 49407 and (tokens[0, 1:-1] == 320).all()
    images, _ = synthetic_pairs(1, 32, 24)
    counts = {}
    for name in rows:
        extra = ["model.moe.capacity_factor=null"] if name == "limoe" else []
        model = create_model(name, ["experiment=smoke", *extra])
        counts[name] = model_cost(model, images, tokens)["model/flops_per_pair"]
        assert rows[name]["flops_per_pair"] == counts[name]
        assert (rows[name]["image_size"], rows[name]["context_length"]) == (32, 24)
    assert rows["limoe"]["flops_vs_against"] == pytest.approx(counts["limoe"] / counts["clip"])
    assert rows["clip"]["against"] is None and rows["clip"]["flops_vs_against"] is None


def test_synthetic_pairs_look_like_tokenized_captions():
    from limoe.bench.gpu import synthetic_pairs
    from limoe.models import text_padding_mask

    images, tokens = synthetic_pairs(64, 8, 12, seed=3)
    assert images.shape == (64, 3, 8, 8) and tokens.shape == (64, 12)
    lengths = text_padding_mask(tokens).sum(1)
    assert (tokens[:, 0] == 49406).all() and lengths.min() >= 2 and lengths.max() <= 12
    rows = torch.arange(64)
    assert (tokens[rows, lengths - 1] == 49407).all()  # end-of-text, found by argmax
    assert (tokens[text_padding_mask(tokens).logical_not()] == 0).all()  # zero padding
    assert torch.equal(synthetic_pairs(64, 8, 12, seed=3)[1], tokens)
