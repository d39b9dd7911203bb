"""Benchmarks behind ``limoe-bench``: the MoE layer against a dense MLP and the one-hot
reference, and the pairs/s of a training step for each model; JSON rows plus a table.

``run_bench`` (``limoe.bench.run``) is the command; it builds models through ``limoe.train``,
so import it from its module (``from limoe.bench.run import run_bench``): the timing pieces
below stay free of the training stack."""

from .layer import LayerCase, layer_cases, run_layer_bench
from .report import check_targets, format_table, machine_info
from .timing import time_interleaved
from .train import run_train_bench

__all__ = [
    "LayerCase",
    "check_targets",
    "format_table",
    "layer_cases",
    "machine_info",
    "run_layer_bench",
    "run_train_bench",
    "time_interleaved",
]
