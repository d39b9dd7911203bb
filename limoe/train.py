"""The one run builder: every run is composed and built here, whoever starts it
(``limoe-train``, ``limoe-eval``, ``limoe-analyze``, ``limoe-bench``, the notebooks, the tests).

``compose(overrides)`` gives the config that ``limoe-train key=value ...`` runs;
``train(cfg)`` fits, tests and writes ``metrics.json``; ``evaluate(cfg)`` recomputes the test
metrics of a checkpoint. The pieces, each built from its part of the config:
``build_datamodule``, ``build_module``, ``build_trainer`` (callbacks and loggers included),
and ``load_checkpoint`` for a trained module with the data it was trained on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from limoe import probe
from limoe.checkpoint import check_fits, read_checkpoint
from limoe.config import compose_config
from limoe.console import log, quiet_fresh_log_dir
from limoe.data.loading import first_pairs
from limoe.lit import ContrastiveModule, NonFiniteLossError
from limoe.lit.callbacks import RoutingHistory, routing_metrics
from limoe.models import model_cost, parameter_counts
from limoe.runs import read_metrics, write_metrics


def compose(
    overrides: Sequence[str] | None = None,
    output_dir: str | Path | None = None,
    name: str = "train",
) -> DictConfig:
    """The config ``limoe-<name> key=value ...`` runs, composed outside a Hydra app.

    What Hydra fills in when the app starts is filled in here: ``arm``, the config group
    choice it names (``${hydra:runtime.choices.model}`` unless set), and
    ``paths.output_dir``, which becomes ``output_dir``.
    """
    cfg = compose_config(name, list(overrides or []), return_hydra_config=True)
    with open_dict(cfg), _hydra_config(cfg):
        if "arm" in cfg:
            cfg.arm = cfg.arm  # resolves ${hydra:runtime.choices.<group>} as the app would
        del cfg["hydra"]
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
    return cfg


@contextlib.contextmanager
def _hydra_config(cfg: DictConfig) -> Iterator[None]:
    """Hydra's runtime config set from ``cfg`` (as a Hydra app sets it), so ``${hydra:...}``
    resolves; the one before is back afterwards."""
    holder = HydraConfig.instance()
    before = holder.cfg
    holder.set_config(cfg)
    try:
        yield
    finally:
        holder.cfg = before


def plain(node: DictConfig) -> dict:
    """A config node as plain, resolved Python containers."""
    return OmegaConf.to_container(node, resolve=True)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    return instantiate(cfg.data)


def build_module(
    cfg: DictConfig, datamodule: L.LightningDataModule | None = None
) -> ContrastiveModule:
    """The LightningModule of ``cfg``, evaluating what ``datamodule`` plans (its
    ``eval_plan``) where given."""
    plans = getattr(datamodule, "eval_plan", None)
    loss = plain(cfg.loss) if cfg.get("loss") else None
    return ContrastiveModule(model=plain(cfg.model), optim=plain(cfg.optim),
                             data=plain(cfg.data), eval_plans=plans, loss=loss)  # fmt: skip


def _instantiate_all(node: DictConfig | None) -> list:
    """Every ``_target_`` entry of a name -> config group (``callbacks``, ``logger``)."""
    if not node:
        return []
    return [instantiate(c) for c in node.values() if c is not None and "_target_" in c]


def build_trainer(cfg: DictConfig, callbacks: Sequence[L.Callback] = (), **kwargs) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the callbacks of ``cfg.callbacks`` (then
    ``callbacks``) and the loggers of ``cfg.logger``; ``kwargs`` override Trainer arguments."""
    kwargs.setdefault("logger", _instantiate_all(cfg.get("logger")) or False)
    for logger in kwargs["logger"] or ():
        quiet_fresh_log_dir(logger.log_dir)
    configured = _instantiate_all(cfg.get("callbacks"))
    return instantiate(cfg.trainer, callbacks=[*configured, *callbacks], **kwargs)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, save ``checkpoints/last.ckpt``, test and write ``metrics.json`` into
    ``cfg.paths.output_dir``; returns the metrics (on global rank 0; ``{}`` on the others,
    and where ``cfg.test`` is false)."""
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    if cfg.get("ckpt_path"):
        key = f"ckpt_path={cfg.ckpt_path}"
        model_cfg = module.hparams["model"]  # the config the module saves and was built from
        check_fits(read_checkpoint(cfg.ckpt_path, "ckpt_path"), module, model_cfg, key)
    # Unusable data stops the run here, before anything that looks like a run is written.
    datamodule.check(("fit", "test") if cfg.get("test", True) else ("fit",))
    trainer = build_trainer(cfg)
    params = parameter_counts(module.model)
    log.info(f"limoe: model {cfg.model._target_} with {params['params_total']:,} parameters "
          f"({params['params_active_per_token']:,} active per token); run dir {output_dir}")  # fmt: skip
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        train_seconds = time.perf_counter() - start
        # ModelCheckpoint writes last.ckpt at validation time; make it hold the final weights.
        trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt", weights_only=False)
    except NonFiniteLossError as error:
        raise NonFiniteLossError(f"{error}; {_last_good_checkpoint(output_dir)}") from None
    if not cfg.get("test", True):
        return {}
    metrics = _test(trainer, module, datamodule)
    metrics.update(_data_counts(trainer, datamodule))
    # FLOPs after training: the experts only run the tokens the trained router keeps.
    cost = _cost(module, datamodule, cfg.data.batch_size)
    samples = trainer.global_step * cfg.data.batch_size * trainer.world_size
    metrics.update(cost)
    metrics.update(_final_routing(trainer))
    metrics["train/wall_seconds"] = train_seconds
    metrics["train/steps"] = trainer.global_step
    metrics["train/samples_per_second"] = samples / train_seconds
    if not trainer.is_global_zero:  # every rank has the same metrics; one writes them
        return {}
    return write_metrics(output_dir / "metrics.json", metrics, cfg.get("arm"), plain(cfg))


def _final_routing(trainer: L.Trainer) -> dict[str, float]:
    """The routing of the last ``RoutingHistory`` record (the final validation) as metrics."""
    for callback in trainer.callbacks:
        if isinstance(callback, RoutingHistory) and callback.last:
            return routing_metrics(callback.last)
    return {}


def _test(trainer: L.Trainer, module: L.LightningModule, datamodule) -> dict[str, float]:
    trainer.test(module, datamodule=datamodule, verbose=False)  # the summary has the table
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")}


def _data_counts(trainer: L.Trainer, datamodule) -> dict[str, float]:
    """Samples read and left out per split and reason (``data/train_skipped_missing_file``),
    those found while loading summed over processes; printed on global rank 0."""
    device = trainer.strategy.root_device

    def summed(loaded: list[int]) -> list[int]:
        tally = torch.tensor(loaded, dtype=torch.long, device=device)
        return trainer.strategy.reduce(tally, reduce_op="sum").tolist()

    metrics = {}
    for split, totals in datamodule.skip_totals(summed).items():
        if trainer.is_global_zero:
            counts = datamodule.counts[split]
            log.info(
                f"limoe: {counts.where}: {totals['rows']} rows, skipped: {counts.summary(totals)}"
            )
        metrics.update({f"data/{split}_{key}": value for key, value in totals.items()})
    return metrics


def _cost(module: ContrastiveModule, datamodule, num_pairs: int) -> dict[str, float]:
    """Parameters and forward FLOPs per pair, counted on the first ``num_pairs`` val pairs
    (test pairs where the data has no val split)."""
    try:
        dataset = datamodule.dataset("val")
    except ValueError:
        dataset = datamodule.dataset("test")
    images, tokens = first_pairs(dataset, num_pairs)
    return model_cost(module.model, images.to(module.device), tokens.to(module.device))


def _last_good_checkpoint(output_dir: Path) -> str:
    """Where a stopped run's weights are: its newest checkpoint, written before the stop."""
    checkpoints = sorted(
        (output_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime
    )
    if not checkpoints:
        return "no checkpoint had been written"
    return f"the last good checkpoint is {checkpoints[-1]} (resume with ckpt_path=...)"


def load_checkpoint(
    ckpt: str | Path, data: Mapping | None = None
) -> tuple[ContrastiveModule, L.LightningDataModule, Path]:
    """A trained module, the datamodule it was trained with (``data`` keys override that
    config) and the checkpoint's run directory."""
    ckpt = Path(ckpt)
    read_checkpoint(ckpt)
    module = ContrastiveModule.load_from_checkpoint(ckpt, map_location="cpu")
    datamodule = instantiate(OmegaConf.merge(module.hparams["data"], data or {}))
    module.eval_plans = datamodule.eval_plan
    return module, datamodule, ckpt.resolve().parent.parent


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """``limoe-eval``: the test metrics of ``cfg.ckpt`` (and a linear probe's, where
    ``cfg.probe`` names one), written to ``metrics.json`` in ``cfg.out`` or the checkpoint's
    run directory. The run's record there keeps its arm, config and training metrics;
    elsewhere the new file gets the arm and config."""
    module, datamodule, run_dir = load_checkpoint(cfg.ckpt, cfg.get("data"))
    datamodule.check(("test",))
    images = probe.probe_images(cfg.probe, datamodule) if probe.wanted(cfg.get("probe")) else None
    trainer = build_trainer(cfg, logger=False)
    metrics = _test(trainer, module, datamodule)
    out = Path(cfg.out) if cfg.get("out") else run_dir
    if images is not None:
        model, batch_size = module.model.eval(), datamodule.eval_batch_size
        metrics.update(probe.probe_metrics(model, images, cfg.probe, cfg.ckpt, out, batch_size))
    metrics.update(_data_counts(trainer, datamodule))
    run = read_metrics(run_dir / "metrics.json")
    kept = run.metrics if out.resolve() == run_dir else {}
    written = write_metrics(out / "metrics.json", {**kept, **metrics}, run.arm, run.config)
    return {k: written[k] for k in metrics}
