"""Console entry points: thin Hydra apps over the run builder (``limoe.train``), the routing
analysis, the benchmarks and the export: ``limoe-train``, ``limoe-eval``, ``limoe-analyze``,
``limoe-bench``, ``limoe-export``.

All take ``key=value`` overrides. Hydra composes the config once, in the app, which checks
the overrides' types there. A user error (a wrong key, group or value, a missing file, a
non-finite loss) ends the command with one line naming it and exit status 2: Hydra is asked to
raise its errors (``HYDRA_FULL_ERROR``) rather than print them, and ``_command`` reports them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest.mock import patch

import hydra
from hydra.errors import HydraException, InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from limoe import train as runs
from limoe.analysis.analyze import analyze as analyze_run
from limoe.bench.run import run_bench
from limoe.config import CONFIG_PATH, check_app_config, check_moved_keys
from limoe.console import (
    log,
    log_metrics,
    metrics_table,
    probe_lines,
    quiet_libraries,
    train_summary,
)
from limoe.factory import export_model
from limoe.lit import NonFiniteLossError

# A user error ends a command with one line; anything else is a bug and keeps its traceback.
# The project raises ValueError (and its subclasses) for bad input of every kind; Hydra's own
# errors (a key, group or override it cannot compose) are the user's too.
USER_ERRORS = (OmegaConfBaseException, ValueError, NonFiniteLossError, HydraException)
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


def error_line(error: BaseException) -> str:
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
    if isinstance(error, HydraException) and not isinstance(error, InstantiationException):
        line = _one_line(str(error))  # composition: Hydra's message spans several lines
    else:
        line = f"{_node(error)}{error_line(_root_cause(error))}"
    print(f"limoe: error: {line}", file=sys.stderr)
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


def _command(app: Callable[[], None]) -> None:
    """Run a Hydra app (which composes the config once); a user error, Hydra's included, ends
    the command with one line naming it, any other error keeps its traceback."""
    # Hydra raises its errors instead of printing them while HYDRA_FULL_ERROR is set
    with patch.dict(os.environ, {"HYDRA_FULL_ERROR": "1"}), _one_line_errors():
        check_moved_keys(sys.argv[1:])
        app()


def _in_app(name: str, run: Callable[[DictConfig], object], cfg: DictConfig) -> object:
    """A command's body in its Hydra app: the overrides' types checked on the config Hydra
    composed, then ``run``. A user error ends it here, in one line (a job that raises would
    have Hydra add a line of its own)."""
    with _one_line_errors():
        check_app_config(cfg, name)
        return run(cfg)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A user error ends the command with one line naming it (``_fail``); any other error
    keeps its traceback."""
    try:
        yield
    except Exception as error:
        if not _is_user_error(error):
            raise
        _fail(error)


def _print_metrics(metrics: dict) -> None:
    for key in sorted(metrics):
        print(f"{key}: {metrics[key]:.4f}")


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    quiet_libraries()
    metrics = _in_app("train", runs.train, cfg)
    if metrics:  # global rank 0 of a run that tested
        log_metrics(metrics)
        log.info(train_summary(metrics, cfg.paths.output_dir))


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base="1.3")
def _evaluate(cfg: DictConfig) -> None:
    quiet_libraries()
    metrics = _in_app("eval", runs.evaluate, cfg)
    print("\n".join(metrics_table(metrics) + probe_lines(metrics)))
    out = cfg.get("out") or Path(cfg.ckpt).resolve().parent.parent
    print(f"every metric in {Path(out) / 'metrics.json'}")


@hydra.main(config_path=CONFIG_PATH, config_name="analyze", version_base="1.3")
def _analyze(cfg: DictConfig) -> None:
    quiet_libraries()
    _print_metrics(_in_app("analyze", analyze_run, cfg))


def _export_run(cfg: DictConfig) -> None:
    out = export_model(cfg.ckpt, cfg.out)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")


@hydra.main(config_path=CONFIG_PATH, config_name="export", version_base="1.3")
def _export(cfg: DictConfig) -> None:
    _in_app("export", _export_run, cfg)


@hydra.main(config_path=CONFIG_PATH, config_name="bench", version_base="1.3")
def _bench(cfg: DictConfig) -> None:
    quiet_libraries()
    _in_app("bench", run_bench, cfg)


def train() -> None:
    """``limoe-train key=value ...``"""
    _command(_train)


def evaluate() -> None:
    """``limoe-eval ckpt=PATH [out=DIR] [+data.test_size=...]``"""
    _command(_evaluate)


def analyze() -> None:
    """``limoe-analyze ckpt=PATH [out=DIR] [split=test] [num_pairs=1000] ...``"""
    _command(_analyze)


def export() -> None:
    """``limoe-export ckpt=PATH out=DIR``"""
    _command(_export)


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
    _command(_bench)
