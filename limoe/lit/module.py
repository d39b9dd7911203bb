"""The LightningModule: contrastive training of any open_clip-surface model, with evaluation.

The module is built from plain config mappings (the model's, the optimiser's, the data's) and
saves them as hyperparameters, so ``ContrastiveModule.load_from_checkpoint(path)`` rebuilds the
same model, and ``limoe-eval`` the same evaluation data, from the checkpoint alone.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Mapping

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from open_clip.loss import ClipLoss
from torch import Tensor

from limoe.eval import retrieval_metrics, topk_accuracy, zeroshot_classifier
from limoe.lit.parallel import (
    gather_optimizer_states,
    grad_norm,
    local_optimizer_states,
    parallel_experts,
    shard_experts,
)
from limoe.lit.routing import routing_stats

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned temperature at 1/100


def no_weight_decay(name: str, param: Tensor) -> bool:
    """Gains, biases (incl. per-expert ``b1``/``b2``) and the temperature are not decayed,
    as in open_clip."""
    return param.ndim < 2 or name.endswith(("bias", ".b1", ".b2")) or "logit_scale" in name


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def all_gather_states(states: dict) -> list[dict]:
    """Every rank's ``states``, through bytes: ``all_gather_object`` alone cannot unpickle
    tensors under torch.load's weights-only default."""
    buffer = io.BytesIO()
    torch.save(states, buffer)
    blobs = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(blobs, buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in blobs]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the run stops before the optimiser
    step, so every checkpoint written so far holds finite weights."""


class ContrastiveModule(L.LightningModule):
    def __init__(self, model: Mapping, optim: Mapping, data: Mapping | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = instantiate(model, _convert_="all")
        self.optim = dict(optim)
        self.clip_loss = ClipLoss()
        self._eval_features: dict[int, list] = defaultdict(list)
        self._classifiers: dict[str, Tensor] = {}
        self._rng_to_restore: dict | None = None
        self._grad_norm: Tensor | None = None  # this step's, for clipping

    def setup(self, stage: str) -> None:
        world_size = self.trainer.world_size
        self.clip_loss = ClipLoss(
            local_loss=world_size > 1,
            gather_with_grad=world_size > 1,
            cache_labels=True,
            rank=self.global_rank,
            world_size=world_size,
        )
        if world_size > 1 and not parallel_experts(self.model):  # once, before DDP wraps
            # model.moe.expert_parallel: each rank keeps E / world_size experts per layer.
            shard_experts(self, self.model, self.global_rank, world_size)

    def forward(self, images: Tensor, tokens: Tensor) -> dict:
        out = self.model(images, tokens)
        if not isinstance(out, dict):
            out = dict(zip(("image_features", "text_features", "logit_scale"), out))
        return out

    def compute_loss(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        """``(loss, contrastive, aux, model outputs)`` of one batch: what a training step
        optimises (``limoe-bench`` times it without a Trainer)."""
        out = self(images, tokens)
        contrastive = self.clip_loss(
            out["image_features"], out["text_features"], out["logit_scale"]
        )
        aux = out.get("aux_loss", contrastive.new_zeros(()))
        return contrastive + aux, contrastive, aux, out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, tokens = batch
        loss, contrastive, aux, out = self.compute_loss(images, tokens)
        log = {
            "train/loss": loss,
            "train/contrastive_loss": contrastive,
            "train/aux_loss": aux,
            "train/temperature": 1.0 / out["logit_scale"].detach(),
        }
        if out.get("routing") and self._logging_step():
            stats = routing_stats(out["routing"], self.model.moe_layers)
            log.update({f"train/{k}": v for k, v in stats.items()})
        log = self._mean_over_ranks(log)  # NaN on any rank makes the mean NaN on every rank
        if not torch.isfinite(log["train/loss"]):
            self._stop(f"loss {log['train/loss'].item()}")
        self.log_dict(log, prog_bar=False, batch_size=images.shape[0])
        self.log("loss", log["train/loss"], prog_bar=True, logger=False, batch_size=images.shape[0])
        return loss

    def _mean_over_ranks(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """The mean of each logged value over the processes, in one all-reduce (the losses
        and the routing statistics are each process's own batch)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
        stacked = self.trainer.strategy.reduce(stacked, reduce_op="mean")
        return dict(zip(values, stacked.unbind()))

    def _stop(self, what: str) -> None:
        raise NonFiniteLossError(f"non-finite {what} at step {self.global_step}; run stopped")

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop on a non-finite gradient before it reaches the weights (the norm is the same
        on every rank after DDP's all-reduce, so all ranks stop together). Lightning clips
        right after this hook; the norm is kept for it rather than computed twice."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._grad_norm = norm = grad_norm(params, self.model)
        if not torch.isfinite(norm):
            self._stop(f"gradient norm {norm.item()}")
        if self._logging_step():
            self.log("train/grad_norm", norm, batch_size=1)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Lightning's clip by norm (``clip_grad_norm_``) with this step's ``grad_norm``:
        computed once, and with expert parallelism the whole model's, so every rank scales
        by the same factor, as one process would."""
        if not gradient_clip_val or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._grad_norm)

    # --- checkpoints: every expert's optimiser state, the random streams (exact resume) ----

    def _optimizer_params(self) -> list[Tensor]:
        """The weights in the optimiser's order, which indexes its state dict."""
        return [p for group in self._param_groups() for p in group["params"]]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if parallel_experts(self.model):  # every expert's moments, from all ranks
            gather_optimizer_states(checkpoint, self._optimizer_params(), self.model)
        states = _collect_rng_states()
        name, keys, pos, has_gauss, gauss = states["numpy"]  # a tensor, not an ndarray, so
        states["numpy"] = (name, torch.from_numpy(keys), pos, has_gauss, gauss)  # weights_only
        distributed = self._trainer is not None and self.trainer.world_size > 1
        checkpoint["rng_states"] = all_gather_states(states) if distributed else [states]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if parallel_experts(self.model):
            local_optimizer_states(checkpoint, self._optimizer_params(), self.model)
        per_rank = checkpoint.get("rng_states")
        states = None
        if per_rank:  # this rank's states (rank 0's where the world size has changed)
            rank = self.global_rank if self.global_rank < len(per_rank) else 0
            states = per_rank[rank]
            name, keys, pos, has_gauss, gauss = states["numpy"]
            states = {**states, "numpy": (name, keys.numpy(), pos, has_gauss, gauss)}
        self._rng_to_restore = states

    def on_train_start(self) -> None:
        """Restore the saved random states only now: starting the data loaders draws from the
        generator, which the interrupted run did before, not after, the checkpoint."""
        if self._rng_to_restore is not None:
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def _logging_step(self) -> bool:
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        return self.global_step % max(1, every) == 0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # --- evaluation: zero-shot classification and retrieval over whole splits -------------

    def _begin_eval(self, stage: str) -> None:
        """Text embeddings of the zero-shot tasks this stage's loaders carry labels for."""
        dm = self.trainer.datamodule
        needed = {task for tasks in dm.eval_tasks(stage) for task in tasks}
        self._eval_features = defaultdict(list)
        self._classifiers = {
            name: zeroshot_classifier(self.model, dm.tokenizer, task.classnames, task.templates)
            for name, task in dm.zeroshot_tasks.items()
            if name in needed
        }

    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        features = {
            "index": batch["index"],
            "valid": batch["valid"],
            "image": self.model.encode_image(batch["image"], normalize=True),
        }
        if "text" in batch:
            features["text"] = self.model.encode_text(batch["text"], normalize=True)
        if "labels" in batch:
            features["labels"] = batch["labels"]
        self._eval_features[dataloader_idx].append(features)

    def _gather(self, batches: list[dict]) -> dict[str, Tensor]:
        """One loader's features from every process, each sample once, in dataset order and
        without the samples whose image could not be read. DDP's sampler gives every rank
        the same number of samples, repeating some to do so; the index removes the repeats."""
        local = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        if self.trainer.world_size > 1:
            local["valid"] = local["valid"].long()
            local = {k: v.flatten(0, 1) for k, v in self.all_gather(local).items()}
        order = torch.zeros(int(local["index"].max()) + 1, dtype=torch.long, device=self.device)
        order[local["index"]] = torch.arange(len(local["index"]), device=self.device)
        keep = order[local["valid"][order].bool()]
        return {key: value[keep] for key, value in local.items()}

    def _end_eval(self, stage: str) -> None:
        dm = self.trainer.datamodule
        names, tasks = dm.eval_names(stage), dm.eval_tasks(stage)
        for idx, batches in sorted(self._eval_features.items()):
            features = self._gather(batches)
            metrics = {}
            if "text" in features:
                metrics.update(retrieval_metrics(features["image"], features["text"]))
            for column, task in enumerate(tasks[idx]):
                logits = features["image"].float() @ self._classifiers[task].float()
                top = topk_accuracy(logits, features["labels"][:, column], ks=(1, 5))
                metrics[f"{task}_zeroshot_top1"] = top[1]
                metrics[f"{task}_zeroshot_top5"] = top[5]
            self.log_dict({f"{names[idx]}/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self._eval_features = defaultdict(list)

    def on_validation_epoch_start(self) -> None:
        self._begin_eval("validate")

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("validate")

    def on_test_epoch_start(self) -> None:
        self._begin_eval("test")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    # --- optimisation ------------------------------------------------------------------------

    def _param_groups(self) -> list[dict]:
        """AdamW's groups: decayed weights, then the rest (their order indexes its state)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return [
            {"params": [p for n, p in named if not no_weight_decay(n, p)],
             "weight_decay": self.optim["weight_decay"]},
            {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0},
        ]  # fmt: skip

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self._param_groups(),
            lr=self.optim["lr"],
            betas=tuple(self.optim["betas"]),
            eps=self.optim["eps"],
        )
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, self.optim["warmup_steps"], total, self.optim["min_lr_ratio"]
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
