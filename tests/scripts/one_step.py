"""Validate, then train one step, of ``limoe-train``'s config; each rank saves its gradients,
losses and validation metrics. Run as a script, so Lightning's DDP can launch it again on
every rank: ``python one_step.py OUT OVERRIDE...``."""

import sys
from pathlib import Path

import lightning as L
import torch

from limoe.train import build_datamodule, build_module, build_trainer, compose


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
    quiet = ["~callbacks", "~logger", "+trainer.enable_checkpointing=false",
             "trainer.enable_progress_bar=false"]  # fmt: skip
    cfg = compose([*overrides, *quiet], output_dir=out)
    L.seed_everything(cfg.seed)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    snapshot = Snapshot(out)
    trainer = build_trainer(cfg, callbacks=[snapshot])
    (val,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    snapshot.saved["val"] = val
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(out / "last.ckpt")  # every rank takes part (expert parallelism)


if __name__ == "__main__":
    main()
