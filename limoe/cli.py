"""Console entry points: thin Hydra apps over the run builder (``limoe.train``), the routing
analysis, the benchmarks and the export: ``limoe-train``, ``limoe-eval``, ``limoe-analyze``,
``limoe-bench``, ``limoe-export``.

All take ``key=value`` overrides. A user error (a wrong key, group or value, a missing file,
a non-finite loss) ends the command with one line naming it and exit status 2.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from limoe import train as runs
from limoe.analysis.analyze import analyze as analyze_run
from limoe.bench.run import run_bench
from limoe.config import CONFIG_PATH, compose_config
from limoe.console import log, log_metrics, metrics_table, quiet_libraries, train_summary
from limoe.factory import export_model
from limoe.lit import NonFiniteLossError

# A user error ends a command with one line; anything else is a bug and keeps its traceback.
# The project raises ValueError (and its subclasses) for bad input of every kind.
USER_ERRORS = (OmegaConfBaseException, ValueError, NonFiniteLossError)
# What a constructor called by Hydra's instantiate raises for a bad config: a wrong argument
# (TypeError), a wrong value (Lightning's own: MisconfigurationException), or a _target_ that
# cannot be imported.
INSTANTIATE_ERRORS = (*USER_ERRORS, TypeError, ImportError, MisconfigurationException)


def _root_cause(error: BaseException) -> BaseException:
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def _is_user_error(error: BaseException) -> bool:
    if isinstance(error, InstantiationException):
        cause = _root_cause(error)
        return cause is error or isinstance(cause, INSTANTIATE_ERRORS)
    return isinstance(error, USER_ERRORS)


def _message(error: BaseException) -> str:
    """The line that names the problem. An error raised in a DataLoader worker comes back as
    ``Caught X in DataLoader worker process 0.`` + the worker's traceback, whose last line is
    ``module.X: message``."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return lines[0]


def _fail(error: BaseException) -> None:
    print(f"limoe: error: {_node(error)}{_message(_root_cause(error))}", file=sys.stderr)
    sys.exit(2)


def _node(error: BaseException) -> str:
    """``trainer: `` where a config node's constructor rejected a value (Hydra's message
    names the node as ``full_key``), so the line names the key."""
    if not isinstance(error, InstantiationException):
        return ""
    found = re.search(r"^full_key: (\S+)$", str(error), re.MULTILINE)
    return f"{found.group(1)}: " if found else ""


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
        compose_config(config_name, overrides)
    except Exception as error:  # Hydra raises several unrelated exception types here
        print(f"limoe: error: {_one_line(str(error))}", file=sys.stderr)
        sys.exit(2)


def _run_or_fail(run: Callable, cfg: DictConfig):
    """Run a command body; a user error ends the command with one line naming it."""
    try:
        return run(cfg)
    except Exception as error:
        if not _is_user_error(error):
            raise
        _fail(error)


def _run_and_print(run: Callable, cfg: DictConfig) -> None:
    metrics = _run_or_fail(run, cfg)
    for key in sorted(metrics):
        print(f"{key}: {metrics[key]:.4f}")


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    quiet_libraries()
    metrics = _run_or_fail(runs.train, cfg)
    if metrics:  # global rank 0 of a run that tested
        log_metrics(metrics)
        log.info(train_summary(metrics, cfg.paths.output_dir))


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base="1.3")
def _evaluate(cfg: DictConfig) -> None:
    quiet_libraries()
    metrics = _run_or_fail(runs.evaluate, cfg)
    print("\n".join(metrics_table(metrics)))
    out = cfg.get("out") or Path(cfg.ckpt).resolve().parent.parent
    print(f"every metric in {Path(out) / 'metrics.json'}")


@hydra.main(config_path=CONFIG_PATH, config_name="analyze", version_base="1.3")
def _analyze(cfg: DictConfig) -> None:
    quiet_libraries()
    _run_and_print(analyze_run, cfg)


def _export_run(cfg: DictConfig) -> None:
    out = export_model(cfg.ckpt, cfg.out)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")


@hydra.main(config_path=CONFIG_PATH, config_name="export", version_base="1.3")
def _export(cfg: DictConfig) -> None:
    _run_or_fail(_export_run, cfg)


@hydra.main(config_path=CONFIG_PATH, config_name="bench", version_base="1.3")
def _bench(cfg: DictConfig) -> None:
    quiet_libraries()
    _run_or_fail(run_bench, cfg)


def train() -> None:
    """``limoe-train key=value ...``"""
    _check_overrides("train", sys.argv[1:])
    _train()


def evaluate() -> None:
    """``limoe-eval ckpt=PATH [out=DIR] [+data.test_size=...]``"""
    _check_overrides("eval", sys.argv[1:])
    _evaluate()


def analyze() -> None:
    """``limoe-analyze ckpt=PATH [out=DIR] [split=test] [num_pairs=1000] ...``"""
    _check_overrides("analyze", sys.argv[1:])
    _analyze()


def export() -> None:
    """``limoe-export ckpt=PATH out=DIR``"""
    _check_overrides("export", sys.argv[1:])
    _export()


def flags_to_overrides(argv: list[str]) -> list[str]:
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
    sys.argv[1:] = flags_to_overrides(sys.argv[1:])
    _check_overrides("bench", sys.argv[1:])
    _bench()
