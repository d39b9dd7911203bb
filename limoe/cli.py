"""Console entry points (Hydra apps): ``limoe-train`` and ``limoe-eval``.

Both take ``key=value`` overrides. Errors in the configuration end the command with a one-line
message naming what is wrong, instead of a stack trace.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import default_collate

from limoe.lit import ContrastiveModule
from limoe.models import model_cost, parameter_counts

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


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
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            compose(config_name, overrides=overrides)
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
    """Parameters and forward FLOPs per pair, counted on the first ``num_pairs`` val pairs."""
    dataset = datamodule.dataset("val")
    images, tokens, _ = default_collate([dataset[i] for i in range(min(num_pairs, len(dataset)))])
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
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
    return write_metrics(metrics, output_dir / "metrics.json")


def _run_and_print(run, *args) -> None:
    """Run a command body; print its metrics, or one line naming a configuration error."""
    try:
        metrics = run(*args)
    except (InstantiationException, OmegaConfBaseException, ValueError, TypeError) as error:
        _fail(error)
    for key in sorted(metrics):
        print(f"{key}: {metrics[key]:.4f}")


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    _run_and_print(run_training, cfg, Path(cfg.paths.output_dir))


def train() -> None:
    """``limoe-train key=value ...``"""
    _check_overrides("train", sys.argv[1:])
    _train()


def run_evaluation(cfg: DictConfig) -> dict:
    ckpt = Path(cfg.ckpt)
    if not ckpt.is_file():
        raise ValueError(f"ckpt={ckpt} is not a file")
    module = ContrastiveModule.load_from_checkpoint(ckpt, map_location="cpu")
    data_cfg = OmegaConf.merge(module.hparams["data"], cfg.get("data") or {})
    datamodule = instantiate(data_cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    trainer.test(module, datamodule=datamodule)
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test")}
    out = Path(cfg.out) if cfg.get("out") else ckpt.resolve().parent.parent
    return write_metrics(metrics, out / "metrics.json")


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def _evaluate(cfg: DictConfig) -> None:
    _run_and_print(run_evaluation, cfg)


def evaluate() -> None:
    """``limoe-eval ckpt=PATH [out=DIR] [+data.test_size=...]``"""
    _check_overrides("eval", sys.argv[1:])
    _evaluate()
