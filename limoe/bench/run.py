"""``limoe-bench``: run the suites a ``conf/bench.yaml`` config asks for, print the tables and
targets, and write every repeat to JSON (after each suite, so a failure later loses nothing).

The training suite steps each model as ``limoe-train model=NAME`` builds it
(``limoe.train.compose`` and ``build_module``), on one batch of that config's val split. The
data suite times the file loaders, then trains ``data.feed.model`` as ``limoe-train data=csv``
builds it, fed by that loader and by one batch in memory.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from limoe.factory import create_model
from limoe.models.limoe import moe_mlp
from limoe.train import build_datamodule, build_module, build_trainer, compose, plain

from .cost import run_cost_bench
from .data import run_feed_bench, run_loader_bench, write_fixture
from .gpu import (
    cuda_graph_layer,
    run_ddp_check,
    run_gemm_layer_bench,
    run_model_steps,
    sync_free_step,
    synthetic_pairs,
)
from .layer import layer_cases, run_layer_bench
from .report import check_targets, format_table, machine_info
from .step import training_step
from .train import StepTimes, in_memory, run_train_bench

# all: layer, train and data; cost (minutes: it builds the 3.5B-parameter LIMoE-L/16) and gpu
# (made for a GPU) run only when named.
SUITES = ("layer", "train", "data", "cost", "gpu", "all")
ALL = ("layer", "train", "data")


def bench_dtype(cfg: DictConfig) -> torch.dtype:
    """``cfg.dtype``, or bfloat16 on CUDA and float32 elsewhere when it is null."""
    name = cfg.dtype or ("bfloat16" if torch.device(cfg.device).type == "cuda" else "float32")
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32, bfloat16 or null, got {name!r}")
    return getattr(torch, name)


def bench_layer(cfg: DictConfig, dtype: torch.dtype) -> list[dict]:
    layer = cfg.layer
    cases = layer_cases(
        layer.num_experts, layer.top_k, layer.capacity_factor, layer.tokens, layer.dim,
        layer.mlp_ratio,
    )  # fmt: skip
    return run_layer_bench(
        cases, layer.modes, layer.passes, layer.warmup, layer.repeats, cfg.device, dtype,
        plain(layer.moe), layer.image_fraction, cfg.seed, cfg.progress,
    )  # fmt: skip


def bench_train(cfg: DictConfig, dtype: torch.dtype) -> list[dict]:
    """Each model of ``train.models`` trained as ``limoe-train model=NAME`` trains it (its
    callbacks, logger and Trainer settings, output in a temporary folder; no validation), on
    the first training batch of the first model's data, held in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        fits, params, batch = {}, {}, None
        for name in cfg.train.models:
            # The run's callbacks but its progress bar (the bench shows its own).
            overrides = [f"model={name}", *cfg.train.overrides, "callbacks.progress_bar=null"]
            if cfg.train.batch_size:
                overrides.append(f"data.batch_size={cfg.train.batch_size}")
            run_cfg = compose(overrides, output_dir=Path(tmp) / name)
            L.seed_everything(cfg.seed, verbose=False)
            module = build_module(run_cfg)
            params[name] = sum(p.numel() for p in module.parameters())
            datamodule = build_datamodule(run_cfg)
            if batch is None:  # the first batch, as the loop gets it
                batch = next(iter(datamodule.train_dataloader()))
            fits[name] = partial(_fit, run_cfg, module, datamodule, batch, cfg.device, dtype)
        return run_train_bench(
            fits, len(batch[0]), params, cfg.train.warmup, cfg.train.repeats,
            cfg.train.rounds, cfg.progress,
        )  # fmt: skip


def _fit(run_cfg, module, datamodule, batch, device: str, dtype: torch.dtype, steps: int):
    """``steps`` training steps of ``module`` in the run's Trainer; the seconds of each.
    Lightning's notes on each fit (devices, model summary, a logging interval longer than the
    fit, the checkpoint folder an earlier fit wrote) are kept off the console."""
    timer = StepTimes()
    datamodule.train_dataloader = in_memory(batch, steps)
    gpu = torch.device(device).type == "cuda"
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
            warnings.filterwarnings("ignore", message="Experiment logs directory .* not empty")
            trainer = build_trainer(
                run_cfg, callbacks=[timer], max_steps=steps, limit_val_batches=0,
                num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                accelerator="gpu" if gpu else "cpu", devices=1,
                precision="bf16-mixed" if dtype == torch.bfloat16 else "32-true",
            )  # fmt: skip
            trainer.fit(module, datamodule=datamodule)
    finally:
        lightning_log.setLevel(level)
    return timer.times


def bench_data(cfg: DictConfig, dtype: torch.dtype) -> dict:
    """Loader pairs/s per format, size and workers; then the training feed: the default
    model on ``data=csv`` files (its default workers) against the same steps in memory."""
    data, feed = cfg.data, cfg.data.feed
    with tempfile.TemporaryDirectory(prefix="limoe-bench-data-") as root:
        root = Path(root)
        loaders = run_loader_bench(
            root, data.formats, data.image_sizes, data.num_workers, data.batch_size,
            data.batches, cfg.progress,
        )  # fmt: skip
        pairs = data.batch_size * (feed.warmup + 1)
        files = write_fixture(root / "feed", feed.file_size, pairs)
        run_cfg = compose([f"model={feed.model}", "data=csv", f"data.train_data={files['csv']}",
                           "data.check_images=false", *feed.overrides])  # fmt: skip
        L.seed_everything(cfg.seed, verbose=False)
        module = build_module(run_cfg)
        datamodule = build_datamodule(run_cfg)
        result = run_feed_bench(
            module, datamodule.train_dataloader(), feed.warmup, feed.steps, feed.rounds,
            cfg.progress, partial(datamodule.on_after_batch_transfer, dataloader_idx=0),
        )  # fmt: skip
    result.update(model=feed.model, image_size=run_cfg.data.image_size, file_size=feed.file_size)
    return {"loaders": loaders, "feed": [result]}


def bench_cost(cfg: DictConfig, dtype: torch.dtype) -> list[dict]:
    """Parameters and forward FLOPs per pair of each model of ``cost.against`` (dtype unused:
    FLOPs are counted in float32 on the CPU)."""
    return run_cost_bench(
        plain(cfg.cost.against), compose, lambda run: create_model(plain(run.model)),
        cfg.cost.overrides, cfg.cost.dropless, cfg.progress,
    )  # fmt: skip


def bench_gpu(cfg: DictConfig, dtype: torch.dtype) -> dict:
    """The GPU check: the MoE layer with each GEMM path against a dense MLP; training steps of
    each model on synthetic pairs; DDP over every GPU when there are two or more."""
    gpu, device = cfg.gpu, torch.device(cfg.device)
    lay = gpu.layer
    cases = layer_cases(lay.num_experts, [1], lay.capacity_factor, lay.tokens, lay.dim,
                        lay.mlp_ratio)  # fmt: skip
    layer_kwargs = dict(cases=cases, passes=lay.passes, warmup=lay.warmup, repeats=lay.repeats,
                        device=device, dtype=dtype, image_fraction=lay.image_fraction,
                        seed=cfg.seed, progress=cfg.progress)  # fmt: skip
    layer = run_gemm_layer_bench(lay.gemms, layer_kwargs, plain(lay.moe), lay.compile)
    modules = {}
    for name, overrides in gpu.train.models.items():
        run_cfg = compose([f"model={name}", *overrides])
        L.seed_everything(cfg.seed, verbose=False)
        vocab = run_cfg.model.get("vocab_size", 49408)
        modules[name] = (build_module(run_cfg), run_cfg.data.image_size,
                         run_cfg.data.context_length, vocab)  # fmt: skip
    checks = sync_checks(modules, gpu.train.batch_size, device, dtype, cfg.seed)
    checks.append(graph_check(lay, device, dtype, cfg.seed))
    train = run_model_steps(modules, gpu.train.batch_size, gpu.train.warmup, gpu.train.steps,
                            device, dtype, cfg.seed, cfg.progress)  # fmt: skip
    processes = gpu.ddp.processes
    if processes is None:
        processes = torch.cuda.device_count() if device.type == "cuda" else 0
    ddp = []
    if processes >= 2:
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        ddp.append(run_ddp_check(processes, gpu.ddp.model, gpu.ddp.overrides, gpu.ddp.steps,
                                 accelerator))  # fmt: skip
    return {"gpu_layer": layer, "gpu_train": train, "ddp": ddp, "gpu_checks": checks}


def sync_checks(modules: dict, batch_size: int, device: torch.device, dtype: torch.dtype,
                seed: int) -> list[dict]:  # fmt: skip
    """Each model's training step under CUDA's sync debug mode (``sync_free_step``)."""
    rows = []
    for name, (module, image_size, context_length, vocab) in modules.items():
        images, tokens = synthetic_pairs(batch_size, image_size, context_length, vocab, device,
                                         seed)  # fmt: skip
        module.to(device).train()
        found = sync_free_step(training_step(module, images, tokens, dtype), device)
        module.cpu()
        rows.append({"check": "sync_free_step", "model": name, **found})
    return rows


def graph_check(lay: DictConfig, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """The bf16 MoE layer of the layer cases (E = the first of them, capacity 1.0, text
    padding routed) captured in a CUDA graph, forward and backward (``cuda_graph_layer``)."""
    torch.manual_seed(seed)
    tokens, dim = lay.tokens[0], lay.dim[0]
    layer = moe_mlp(dim, lay.mlp_ratio, lay.num_experts[0], capacity_factor=1.0)
    layer = layer.to(device, dtype)
    x = torch.randn(tokens, dim, device=device, dtype=dtype)
    modality = (torch.arange(tokens, device=device) >= int(lay.image_fraction * tokens)).long()
    valid = torch.arange(tokens, device=device) < tokens - tokens // 10
    return {"check": "cuda_graph_layer", "model": f"MoELayer E={lay.num_experts[0]}",
            **cuda_graph_layer(layer, x, modality, valid)}  # fmt: skip


def run_bench(cfg: DictConfig) -> dict:
    """Run the chosen suites; print the tables and targets; write everything to JSON."""
    if cfg.suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {cfg.suite!r}")
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA GPU")
    dtype = bench_dtype(cfg)
    results = {"machine": machine_info(cfg.device), "dtype": str(dtype).removeprefix("torch.")}
    results.update(config=plain(cfg), layer=[], train=[], loaders=[], feed=[], cost=[],
                   gpu_layer=[], gpu_train=[], ddp=[], gpu_checks=[], targets=[])  # fmt: skip
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.output_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    suites = {"layer": bench_layer, "train": bench_train, "data": bench_data, "cost": bench_cost,
              "gpu": bench_gpu}  # fmt: skip
    for name, run in suites.items():
        if cfg.suite == name or (cfg.suite == "all" and name in ALL):
            found = run(cfg, dtype)
            results.update(found if isinstance(found, dict) else {name: found})
            results["targets"] = check_targets(results)
            out.write_text(json.dumps(results, indent=2) + "\n")  # kept if a later suite fails
    print(format_table(results))
    print(f"limoe: benchmark of {results['machine']['device']} ({results['dtype']}) -> {out}")
    return results
