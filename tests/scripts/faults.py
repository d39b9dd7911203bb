"""Faults injected into ``limoe-train`` runs (this folder on PYTHONPATH):
``+callbacks.crash._target_=faults.CrashAt +callbacks.crash.step=N`` kills the process with no
clean-up, like SIGKILL; ``faults.PoisonAt`` makes the weights NaN, as a diverged run does."""

import os

import lightning as L
import torch


class CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os._exit(9)


class PoisonAt(CrashAt):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))
