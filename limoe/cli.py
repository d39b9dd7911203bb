"""Console entry points (Hydra apps): ``limoe-train``, ``limoe-eval``, ``limoe-analyze`` and
``limoe-bench``.

All take ``key=value`` overrides. Errors in the configuration end the command with a one-line
message naming what is wrong, instead of a stack trace.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import default_collate

from limoe import config
from limoe.analysis.report import write_report
from limoe.analysis.routing import collect_routing
from limoe.bench import (
    check_targets,
    format_table,
    layer_cases,
    machine_info,
    run_layer_bench,
    run_train_bench,
)
from limoe.config import CONFIG_PATH
from limoe.lit import ContrastiveModule, NonFiniteLossError, read_history
from limoe.models import model_cost, parameter_counts


def _root_cause(error: BaseException) -> BaseException:
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def _fail(error: BaseException) -> None:
    cause = _root_cause(error)
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    print(f"limoe: error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(message: str) -> str:
    """Hydra's composition errors span several lines; keep what names the problem."""
    noise = ("full_key:", "object_type", "Config search path", "provider=", "Set the environment")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(line for line in lines if not line.startswith(noise))


def _check_overrides(config_name: str, argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so that a wrong key, group or value fails
    with one line naming it (multirun sweeps and Hydra's own flags are left to Hydra)."""
    if any(a in ("-m", "--multirun") or a.startswith("-") for a in argv):
        return
    overrides = [a for a in argv if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    try:
        config.compose_config(config_name, overrides)
    except Exception as error:  # Hydra raises several unrelated exception types here
        print(f"limoe: error: {_one_line(str(error))}", file=sys.stderr)
        sys.exit(2)


def _instantiate_all(node: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a name -> config group (callbacks, loggers)."""
    if not node:
        return []
    return [instantiate(cfg) for cfg in node.values() if cfg is not None and "_target_" in cfg]


def _plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def write_metrics(metrics: dict, path: Path) -> dict:
    """Write flat ``stage/name`` metrics as JSON (floats), sorted by key."""
    flat = {k: float(v) for k, v in sorted(metrics.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(flat, indent=2) + "\n")
    return flat


def _cost(module: ContrastiveModule, datamodule, num_pairs: int) -> dict:
    """Parameters and forward FLOPs per pair, counted on the first ``num_pairs`` val pairs
    (test pairs where the data has no val split)."""
    try:
        dataset = datamodule.dataset("val")
    except ValueError:
        dataset = datamodule.dataset("test")
    images, tokens = default_collate([dataset[i][:2] for i in range(min(num_pairs, len(dataset)))])
    return model_cost(module.model, images.to(module.device), tokens.to(module.device))


def run_training(cfg: DictConfig, output_dir: Path) -> dict:
    """Fit, test and write ``metrics.json`` into ``output_dir``; returns the test metrics."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = ContrastiveModule(
        model=_plain(cfg.model), optim=_plain(cfg.optim), data=_plain(cfg.data)
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=_instantiate_all(cfg.get("logger")) or False,
    )  # fmt: skip
    params = parameter_counts(module.model)
    print(f"limoe: model {cfg.model._target_} with {params['params_total']:,} parameters "
          f"({params['params_active_per_token']:,} active per token); run dir {output_dir}")  # fmt: skip
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except NonFiniteLossError as error:
        raise NonFiniteLossError(f"{error}; {_last_good_checkpoint(output_dir)}") from None
    train_seconds = time.perf_counter() - start
    # ModelCheckpoint writes last.ckpt at validation time; make it hold the final weights.
    trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt")
    if not cfg.get("test", True):
        return {}
    trainer.test(module, datamodule=datamodule)
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test")}
    # FLOPs after training: the experts only run the tokens the trained router keeps.
    cost = _cost(module, datamodule, cfg.data.batch_size)
    print(f"limoe: {cost['model/flops_per_pair'] / 1e6:.2f} MFLOPs forward per image-text pair")
    samples = trainer.global_step * cfg.data.batch_size * trainer.world_size
    metrics.update(cost)
    metrics["train/wall_seconds"] = train_seconds
    metrics["train/steps"] = trainer.global_step
    metrics["train/samples_per_second"] = samples / train_seconds
    if not trainer.is_global_zero:  # every rank has the same metrics; one writes them
        return {}
    return write_metrics(metrics, output_dir / "metrics.json")


def _last_good_checkpoint(output_dir: Path) -> str:
    """Where a stopped run's weights are: its newest checkpoint, written before the stop."""
    checkpoints = sorted(
        (output_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime
    )
    if not checkpoints:
        return "no checkpoint had been written"
    return f"the last good checkpoint is {checkpoints[-1]} (resume with ckpt_path=...)"


def _compose(
    overrides: list[str] | None, output_dir: str | Path | None, name: str
) -> tuple[DictConfig, dict]:
    """The config as ``compose_config`` returns it, and the option chosen in each config group
    (``{"model": "limoe", ...}``, what Hydra records in ``.hydra/hydra.yaml``)."""
    cfg = config.compose_config(name, overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
    return cfg, choices


def compose_config(
    overrides: list[str] | None = None, output_dir: str | Path | None = None, name: str = "train"
) -> DictConfig:
    """The config ``limoe-train key=value ...`` runs, composed outside a Hydra app (notebooks,
    scripts); ``paths.output_dir``, which Hydra fills in at run time, becomes ``output_dir``."""
    return _compose(overrides, output_dir, name)[0]


def train_run(overrides: list[str] | None, output_dir: str | Path) -> dict:
    """``limoe-train`` from Python: compose, save the config and the group choices where Hydra
    would (``.hydra/``, which ``limoe-compare`` reads), train and test in ``output_dir``;
    returns the test metrics (also in ``metrics.json``)."""
    output_dir = Path(output_dir)
    cfg, choices = _compose(overrides, output_dir, "train")
    hydra_dir = output_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    runtime = {"hydra": {"runtime": {"choices": choices}}}
    OmegaConf.save(OmegaConf.create(runtime), hydra_dir / "hydra.yaml")
    return run_training(cfg, output_dir)


def _run_or_fail(run, *args):
    """Run a command body; a configuration error ends the command with one line naming it."""
    try:
        return run(*args)
    except (
        InstantiationException, OmegaConfBaseException, ValueError, TypeError, NonFiniteLossError
    ) as error:  # fmt: skip
        _fail(error)


def _run_and_print(run, *args) -> None:
    """Run a command body and print its metrics."""
    metrics = _run_or_fail(run, *args)
    for key in sorted(metrics):
        print(f"{key}: {metrics[key]:.4f}")


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    _run_and_print(run_training, cfg, Path(cfg.paths.output_dir))


def train() -> None:
    """``limoe-train key=value ...``"""
    _check_overrides("train", sys.argv[1:])
    _train()


def run_evaluation(cfg: DictConfig) -> dict:
    module, datamodule, run_dir = _load_checkpoint(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    trainer.test(module, datamodule=datamodule)
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test")}
    out = Path(cfg.out) if cfg.get("out") else run_dir
    return write_metrics(metrics, out / "metrics.json")


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base="1.3")
def _evaluate(cfg: DictConfig) -> None:
    _run_and_print(run_evaluation, cfg)


def evaluate() -> None:
    """``limoe-eval ckpt=PATH [out=DIR] [+data.test_size=...]``"""
    _check_overrides("eval", sys.argv[1:])
    _evaluate()


def _load_checkpoint(cfg: DictConfig) -> tuple[ContrastiveModule, L.LightningDataModule, Path]:
    """The module, the datamodule it was trained with (``cfg.data`` keys override it) and the
    checkpoint's run directory."""
    ckpt = Path(cfg.ckpt)
    if not ckpt.is_file():
        raise ValueError(f"ckpt={ckpt} is not a file")
    module = ContrastiveModule.load_from_checkpoint(ckpt, map_location="cpu")
    data_cfg = OmegaConf.merge(module.hparams["data"], cfg.get("data") or {})
    return module, instantiate(data_cfg), ckpt.resolve().parent.parent


def run_analysis(cfg: DictConfig) -> dict:
    """Route held-out pairs through a checkpoint and write ``routing/``; returns, per layer,
    the number of image-only, text-only, shared and unused experts."""
    module, datamodule, run_dir = _load_checkpoint(cfg)
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


@hydra.main(config_path=CONFIG_PATH, config_name="analyze", version_base="1.3")
def _analyze(cfg: DictConfig) -> None:
    _run_and_print(run_analysis, cfg)


def analyze() -> None:
    """``limoe-analyze ckpt=PATH [out=DIR] [split=test] [num_pairs=1000] ...``"""
    _check_overrides("analyze", sys.argv[1:])
    _analyze()


BENCH_SUITES = ("layer", "train", "all")


def _bench_dtype(cfg: DictConfig) -> torch.dtype:
    name = cfg.dtype or ("bfloat16" if torch.device(cfg.device).type == "cuda" else "float32")
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32, bfloat16 or null, got {name!r}")
    return getattr(torch, name)


def _bench_layer(cfg: DictConfig, dtype: torch.dtype) -> list[dict]:
    layer = cfg.layer
    cases = layer_cases(
        layer.num_experts, layer.top_k, layer.capacity_factor, layer.tokens, layer.dim,
        layer.mlp_ratio,
    )  # fmt: skip
    return run_layer_bench(
        cases, layer.modes, layer.passes, layer.warmup, layer.repeats, cfg.device, dtype,
        _plain(layer.moe), layer.image_fraction, cfg.seed, cfg.progress,
    )  # fmt: skip


def _bench_train(cfg: DictConfig, dtype: torch.dtype) -> list[dict]:
    """Each model of ``train.models`` as ``limoe-train model=NAME`` builds it, stepped on the
    same batch: the first pairs of the data config's val split."""
    modules, batch = {}, None
    for name in cfg.train.models:
        run_cfg = compose_config([f"model={name}", *cfg.train.overrides])
        L.seed_everything(cfg.seed, verbose=False)
        modules[name] = ContrastiveModule(model=_plain(run_cfg.model), optim=_plain(run_cfg.optim))
        if batch is None:
            size = cfg.train.batch_size or run_cfg.data.batch_size
            dataset = instantiate(run_cfg.data).dataset("val")
            batch = default_collate([dataset[i] for i in range(min(size, len(dataset)))])
    images, tokens = (t.to(cfg.device) for t in batch[:2])
    return run_train_bench(
        modules, images, tokens, cfg.train.warmup, cfg.train.repeats, dtype, cfg.progress
    )


def run_bench(cfg: DictConfig) -> dict:
    """Run the chosen suites; print the tables and targets; write everything to JSON."""
    if cfg.suite not in BENCH_SUITES:
        raise ValueError(f"suite must be one of {BENCH_SUITES}, got {cfg.suite!r}")
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA GPU")
    dtype = _bench_dtype(cfg)
    results = {"machine": machine_info(cfg.device), "dtype": str(dtype).removeprefix("torch.")}
    results.update(config=_plain(cfg), layer=[], train=[], targets=[])
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.output_dir) / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    suites = {"layer": _bench_layer, "train": _bench_train}
    for name, run in suites.items():
        if cfg.suite in (name, "all"):
            results[name] = run(cfg, dtype)
            results["targets"] = check_targets(results["layer"], results["train"])
            out.write_text(json.dumps(results, indent=2) + "\n")  # kept if a later suite fails
    print(format_table(results))
    print(f"limoe: benchmark of {results['machine']['device']} ({results['dtype']}) -> {out}")
    return results


@hydra.main(config_path=CONFIG_PATH, config_name="bench", version_base="1.3")
def _bench(cfg: DictConfig) -> None:
    _run_or_fail(run_bench, cfg)


def _flags_to_overrides(argv: list[str]) -> list[str]:
    """``--device cuda`` / ``--device=cuda`` -> ``device=cuda``: the flag spelling of a key,
    so both forms work; Hydra's own flags (``-m``, ``--cfg``, ...) pass through."""
    keys = {"--device", "--dtype", "--suite", "--out", "--seed"}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg.split("=", 1)[0]
        if key in keys and "=" in arg:
            out.append(arg[2:])
        elif key in keys and i + 1 < len(argv):
            out.append(f"{arg[2:]}={argv[i + 1]}")
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def bench() -> None:
    """``limoe-bench [suite=layer|train|all] [device=cpu|cuda] [layer.num_experts=[8,32]] ...``"""
    sys.argv[1:] = _flags_to_overrides(sys.argv[1:])
    _check_overrides("bench", sys.argv[1:])
    _bench()
