"""The LightningModule: contrastive training of any open_clip-surface model. It holds the
loss, the logging and the optimiser; evaluation is ``limoe.eval.Evaluation`` over the plans it
is handed (``eval_plans``), exact resume the ``ExactResume`` callback, expert parallelism the
``ExpertParallel`` callback (which this module brings along).

The module is built from plain config mappings (the model's, the optimiser's, the data's) and
saves them as hyperparameters, so ``ContrastiveModule.load_from_checkpoint(path)`` rebuilds the
same model, and ``limoe-eval`` the same evaluation data, from the checkpoint alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from open_clip.loss import ClipLoss, SigLipLoss
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from limoe.eval import Evaluation
from limoe.eval.plan import EvalPlan
from limoe.factory import build_model
from limoe.lit.parallel import ExpertParallel, grad_norm
from limoe.models.upcycle import pop_upcycle
from limoe.moe.balance import update_expert_bias
from limoe.moe.statistics import routing_stats

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned temperature at 1/100
# Not decayed besides timm's 1-D weights and biases (as open_clip): the experts' batched biases
# ([E, hidden], 2-D) and the temperature.
NO_WEIGHT_DECAY = ("*.b1", "*.b2", "*logit_scale")
# The loss where none is given (conf/loss/clip.yaml).
CLIP_LOSS = {"_target_": "open_clip.loss.ClipLoss", "cache_labels": True}


def build_loss(loss: Mapping, rank: int = 0, world_size: int = 1) -> nn.Module:
    """open_clip's contrastive loss of the ``loss`` node (``_target_``: ``ClipLoss`` or
    ``SigLipLoss``) for this process of ``world_size``, set up as open_clip's training sets it
    up: ``ClipLoss`` gathers the features with their gradients and scores this process's rows
    against all columns (``--local-loss --gather-with-grad``); ``SigLipLoss`` exchanges the
    captions between neighbours. Either way the mean over the processes is the one-process
    loss of the whole batch, and DDP's mean gradient its gradient."""
    cls = get_class(loss["_target_"])
    if not issubclass(cls, (ClipLoss, SigLipLoss)):
        raise ValueError(f"loss._target_ must be open_clip.loss.ClipLoss or SigLipLoss, got "
                         f"{loss['_target_']!r}")  # fmt: skip
    distributed = {"rank": rank, "world_size": world_size}
    if issubclass(cls, ClipLoss):
        distributed |= {"local_loss": world_size > 1, "gather_with_grad": world_size > 1}
    return instantiate(dict(loss), **distributed)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1 (``(step + 1) / warmup_steps``), then
    cosine decay to ``min_ratio``. timm's and torch's warmup schedulers start from another
    value at step 0, so this one is kept as a ``LambdaLR``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the run stops at the next logging
    step, validation or checkpoint, before any checkpoint is written after it, so every
    checkpoint written holds finite weights."""


class ContrastiveModule(L.LightningModule):
    def __init__(
        self,
        model: Mapping,
        optim: Mapping,
        data: Mapping | None = None,
        eval_plans: Callable[[str], EvalPlan] | None = None,
        loss: Mapping | None = None,
    ) -> None:
        """``eval_plans(stage)``: what to evaluate at validation and test (``limoe.train``
        hands over its datamodule's ``eval_plan``); None: a module that only trains (a
        validation or test then stops with a one-line error). ``loss``: the config's ``loss``
        node (None: CLIP's, ``CLIP_LOSS``)."""
        super().__init__()
        loss = dict(loss or CLIP_LOSS)
        # upcycle_from names where the first weights come from: used once, here, and kept out
        # of the hyperparameters, so the checkpoint reloads without the dense one.
        self.save_hyperparameters(
            {"model": pop_upcycle(model)[0], "optim": optim, "data": data, "loss": loss}
        )
        self.model = build_model(model)
        self.optim = dict(optim)
        self.eval_plans = eval_plans
        self.loss_config = loss
        self.clip_loss = build_loss(loss)
        self.takes_bias = isinstance(self.clip_loss, SigLipLoss)
        if self.takes_bias and getattr(self.model, "logit_bias", None) is None:
            raise ValueError("loss=siglip needs a model with a logit bias: set "
                             "model.init_logit_bias (conf/loss/siglip.yaml sets -10)")  # fmt: skip
        self._evaluation: Evaluation | None = None
        self._grad_norm: Tensor | None = None  # this step's, for clipping
        self._nonfinite: Tensor | None = None  # the first non-finite loss or norm (on device)

    def configure_callbacks(self) -> list[L.Callback]:
        """``ExpertParallel`` once: a Trainer that ran ``fit`` already holds it at ``test``."""
        if any(isinstance(c, ExpertParallel) for c in self.trainer.callbacks):
            return []
        return [ExpertParallel()]

    def setup(self, stage: str) -> None:
        self.clip_loss = build_loss(self.loss_config, self.global_rank, self.trainer.world_size)

    # --- the loss and its logging ---------------------------------------------------------

    def forward(self, images: Tensor, tokens: Tensor) -> dict:
        out = self.model(images, tokens)
        if not isinstance(out, dict):
            out = dict(zip(("image_features", "text_features", "logit_scale", "logit_bias"), out))
        return out

    def compute_loss(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        """``(loss, contrastive, aux, model outputs)`` of one batch: what a training step
        optimises (``limoe-bench`` times it without a Trainer)."""
        out = self(images, tokens)
        scores = [out["image_features"], out["text_features"], out["logit_scale"]]
        contrastive = self.clip_loss(*scores, *([out["logit_bias"]] if self.takes_bias else []))
        aux = out.get("aux_loss", contrastive.new_zeros(()))
        return contrastive + aux, contrastive, aux, out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, tokens = batch
        loss, contrastive, aux, out = self.compute_loss(images, tokens)
        self._watch_finite(0, loss)
        if self._logging_step():
            log = {
                "train/loss": loss,
                "train/contrastive_loss": contrastive,
                "train/aux_loss": aux,
                "train/temperature": 1.0 / out["logit_scale"],
            }
            if out.get("routing"):
                stats = routing_stats(out["routing"], self.model.moe_layers)
                log.update({f"train/{k}": v for k, v in stats.items()})
            log = self._to_host(self._mean_over_ranks(log))
            self.log_dict(log, prog_bar=False, batch_size=images.shape[0])
            self.log("loss", log["train/loss"], prog_bar=True, logger=False,
                     batch_size=images.shape[0])  # fmt: skip
        return loss

    def _to_host(self, values: dict[str, Tensor]) -> dict[str, float]:
        """The logged values as floats in one transfer, with the finite check read in the same
        one: on logging steps alone, with the gradient norm's (``on_before_optimizer_step``)
        the only host reads of a training step."""
        flat = [v.detach().double().reshape(()) for v in values.values()]
        record = self._nonfinite if self._nonfinite is not None else flat[0].new_full((3,), -1)
        *floats, step, kind, value = torch.cat([torch.stack(flat), record]).tolist()
        self._raise_if_nonfinite(step, kind, value)
        return dict(zip(values, floats))

    def _watch_finite(self, kind: int, value: Tensor) -> None:
        """Keep the first non-finite loss (``kind`` 0) or gradient norm (1) of the run on the
        device, as ``[step, kind, value]``: checking it with a Python ``bool`` at every step
        would make the host wait for the device there. It is read at the logging steps, before
        every checkpoint, at validation and at the end of training (``check_finite``), so the
        run stops within ``log_every_n_steps`` and no checkpoint is written after it."""
        value = value.detach().double().reshape(())
        if self._nonfinite is None or self._nonfinite.device != value.device:
            self._nonfinite = value.new_full((3,), -1)
        here = torch.stack([torch.full_like(value, self.global_step), torch.full_like(value, kind),
                            value])  # fmt: skip
        first = (self._nonfinite[0] < 0) & ~torch.isfinite(value)
        self._nonfinite = torch.where(first, here, self._nonfinite)

    def check_finite(self) -> None:
        """Stop with ``NonFiniteLossError`` if a loss or gradient norm so far was not finite
        (a host read of ``_watch_finite``'s record)."""
        if self._nonfinite is not None:
            self._raise_if_nonfinite(*self._nonfinite.tolist())

    def _raise_if_nonfinite(self, step: float, kind: float, value: float) -> None:
        if step >= 0:
            what = ("loss", "gradient norm")[int(kind)]
            raise NonFiniteLossError(f"non-finite {what} {value} at step {int(step)}; run stopped")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # before the checkpoint is written: it holds finite weights only

    def on_train_end(self) -> None:
        self.check_finite()

    def _mean_over_ranks(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """The mean of each logged value over the processes, in one all-reduce (the losses
        and the routing statistics are each process's own batch)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
        stacked = self.trainer.strategy.reduce(stacked, reduce_op="mean")
        return dict(zip(values, stacked.unbind()))

    def _logging_step(self) -> bool:
        """The steps the logger writes, by Lightning's rule: every ``log_every_n_steps``-th,
        counted from 1 (``global_step + 1``), and the last; without a Trainer, every step."""
        if self._trainer is None:
            return True
        trainer = self.trainer
        last = trainer.max_steps > 0 and self.global_step + 1 >= trainer.max_steps
        every = max(1, trainer.log_every_n_steps)
        return last or bool(trainer.fast_dev_run) or (self.global_step + 1) % every == 0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # --- evaluation: limoe.eval over the plans the module is handed ------------------------

    def _start_evaluation(self, stage: str) -> None:
        if self.eval_plans is None:
            raise ValueError(
                "nothing to evaluate: give ContrastiveModule eval_plans "
                "(limoe.train.build_module(cfg, datamodule) hands the datamodule's)"
            )
        self._evaluation = Evaluation(self.model, self.eval_plans(stage))

    def _log_evaluation(self) -> None:
        all_gather = self.all_gather if self.trainer.world_size > 1 else None
        self.log_dict(self._evaluation.compute(all_gather), sync_dist=True)
        self._evaluation = None

    def on_validation_epoch_start(self) -> None:
        self.check_finite()
        self._start_evaluation("validate")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation.add(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation.add(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation()

    # --- the optimiser ---------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """AdamW's groups by timm's rule (``NO_WEIGHT_DECAY`` added), decayed weights first:
        the order indexes the optimiser state that checkpoints hold."""
        groups = param_groups_weight_decay(
            self.model, self.optim["weight_decay"], no_weight_decay_list=NO_WEIGHT_DECAY
        )
        return sorted(groups, key=lambda group: group["weight_decay"] == 0)

    def optimizer_params(self) -> list[Tensor]:
        """The weights in the optimiser's order, which indexes its state dict."""
        return [p for group in self.param_groups() for p in group["params"]]

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW over ``param_groups``; fused (one kernel for all the element-wise update
        work, CPU and CUDA) unless ``optim.fused`` is false: the unfused update of a small
        model is a large share of its step, and the larger for the experts' parameters."""
        return torch.optim.AdamW(
            self.param_groups(),
            lr=self.optim["lr"],
            betas=tuple(self.optim["betas"]),
            eps=self.optim["eps"],
            fused=self.optim.get("fused", True) or None,
        )

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        total = self.optim.get("schedule_steps") or self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        # A run continuing another from its weights (model.upcycle_from) picks up the longer
        # run's schedule at schedule_from_step instead of warming up again.
        offset = self.optim.get("schedule_from_step", 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step + offset, self.optim["warmup_steps"], total, self.optim["min_lr_ratio"]
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs) -> None:
        """Lightning's step, then the expert biases of bias-balanced routers
        (``model.moe.router.balance=bias``) from the counts of every micro-batch of this step
        on every process: Lightning calls this once per optimiser step, after the last
        micro-batch's forward and backward (run inside the step, as its closure)."""
        super().optimizer_step(*args, **kwargs)
        update_expert_bias(self.model)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Watch the gradient norm for a non-finite value (``_watch_finite``; the norm is the
        same on every rank after DDP's all-reduce, so all ranks stop together). Lightning
        clips right after this hook; the norm is kept for it rather than computed twice."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._grad_norm = norm = grad_norm(params, self.model)
        self._watch_finite(1, norm)
        if self._logging_step():
            self.log("train/grad_norm", norm.item(), batch_size=1)

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
