"""Validate, then train one step, of ``limoe-train``'s config; each rank saves its gradients,
losses and validation metrics. Run as a script, so Lightning's DDP can launch it again on
every rank: ``python one_step.py OUT OVERRIDE...``."""

import sys
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from limoe.cli import compose_config
from limoe.lit import ContrastiveModule


class Snapshot(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.saved = out, {}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.saved["grads"] = {
            name: p.grad.detach().clone()
            for name, p in module.model.named_parameters()
            if p.grad is not None
        }

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.saved["local_loss"] = float(outputs["loss"])
        self.saved["logged_loss"] = float(trainer.callback_metrics["train/loss"])
        self.saved["batch_size"] = len(batch[0])
        torch.save(self.saved, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = compose_config(overrides, output_dir=out)
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    L.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data)
    module = ContrastiveModule(plain(cfg.model), plain(cfg.optim), plain(cfg.data))
    snapshot = Snapshot(out)
    trainer = instantiate(cfg.trainer, callbacks=[snapshot], logger=False,
                          enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    (val,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    snapshot.saved["val"] = val
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(out / "last.ckpt")  # every rank takes part (expert parallelism)


if __name__ == "__main__":
    main()
