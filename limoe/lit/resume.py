"""Exact resume: a run resumed from ``last.ckpt`` draws the same random numbers (gating
noise, dropout, augmentation) as the run that was interrupted.

Lightning checkpoints the weights, optimiser, schedule and loop state, and our loaders their
position (``limoe.data.loading``); the random streams are left out. ``ExactResume`` saves every
process's streams into the checkpoint and gives each process its own back when training
starts again.
"""

from __future__ import annotations

import io

import lightning as L
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


def random_states() -> dict:
    """This process's torch (CPU and CUDA), numpy and Python random states, in types that
    ``torch.load(weights_only=True)`` reads back (numpy's key array as a tensor).

    Lightning's private ``_collect_rng_states`` does the collecting; this function is the
    one place that depends on it (``tests/test_lit.py`` fails if it changes)."""
    states = _collect_rng_states()
    name, keys, pos, has_gauss, gauss = states["numpy"]
    states["numpy"] = (name, torch.from_numpy(keys), pos, has_gauss, gauss)
    return states


def restore_random_states(states: dict) -> None:
    """Undo ``random_states``: every stream continues from where it was collected."""
    name, keys, pos, has_gauss, gauss = states["numpy"]
    _set_rng_states({**states, "numpy": (name, keys.numpy(), pos, has_gauss, gauss)})


def all_gather_states(states: dict) -> list[dict]:
    """Every rank's ``states``, through bytes: ``all_gather_object`` alone cannot unpickle
    tensors under torch.load's weights-only default."""
    buffer = io.BytesIO()
    torch.save(states, buffer)
    blobs = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(blobs, buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in blobs]


class ExactResume(L.Callback):
    """Saves each rank's random states in the checkpoint (``rng_states``, one per rank) and
    restores this rank's (rank 0's where the world size has changed) when training starts."""

    def __init__(self) -> None:
        self._to_restore: dict | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        states = random_states()
        distributed = trainer.world_size > 1
        checkpoint["rng_states"] = all_gather_states(states) if distributed else [states]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        per_rank = checkpoint.get("rng_states")
        if per_rank:
            rank = trainer.global_rank if trainer.global_rank < len(per_rank) else 0
            self._to_restore = per_rank[rank]

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        """Restore only now: starting the data loaders draws from the generator, which the
        interrupted run did before, not after, the checkpoint."""
        if self._to_restore is not None:
            restore_random_states(self._to_restore)
            self._to_restore = None
