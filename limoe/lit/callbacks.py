"""Lightning callbacks: routing statistics over training."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from limoe.data.loading import first_pairs
from limoe.moe.statistics import MODALITY_NAMES, layer_summary, switched_share


class RoutingHistory(L.Callback):
    """At the start of training and at every validation, route the same held-out pairs through
    the tower and append each MoE layer's ``layer_summary`` to ``dirpath/history.jsonl`` (one JSON object per line:
    ``{"step": ..., "layers": {"2": summary, ...}}``).

    Each layer's summary also holds what says whether routing has settled and how the experts
    grow: ``switched`` (per modality, the share of the pairs' tokens whose first-choice expert
    changed since the previous record; null in the first) and ``expert_norm`` (``w1``/``w2``:
    each expert's Frobenius norms, beside ``router`` the router's). The router weights'
    gradient norm of each layer, before clipping, is logged as ``router/layer{l}_grad_norm``.

    Both modalities of the pair set are routed in one call, as in training and evaluation, so
    capacity and Batch Priority Routing act on the same mixed token set. Models without MoE
    layers are skipped. Every
    rank routes the first ``num_pairs`` pairs of ``split`` (expert-parallel layers need all
    ranks); global rank 0 writes.
    """

    def __init__(
        self,
        dirpath: str,
        num_pairs: int = 256,
        split: str = "val",
        threshold: float = 0.9,
        min_share: float = 0.01,
    ) -> None:
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        self.path = Path(dirpath) / "history.jsonl"
        self.num_pairs = num_pairs
        self.split = split
        self.threshold = threshold
        self.min_share = min_share
        self._pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last: dict[str, dict] | None = None  # the latest record's layers
        self._first_choice: dict[str, torch.Tensor] = {}  # per layer, at the latest record

    def _load_pairs(self, datamodule) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first ``num_pairs`` pairs of ``split``; None (with a warning, once) when the
        data has no such split, e.g. ``data=csv`` without ``data.val_data``, or no
        datamodule to read it from (a Trainer given plain dataloaders)."""
        if self._pairs is None:
            try:
                if not hasattr(datamodule, "dataset"):
                    raise ValueError("the Trainer runs no limoe datamodule to take pairs from")
                dataset = datamodule.dataset(self.split)
            except ValueError as error:
                rank_zero_warn(f"RoutingHistory records nothing: {error}")
                self._pairs = ()
                return None
            self._pairs = first_pairs(dataset, self.num_pairs)
        return self._pairs or None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The routing at initialisation, the baseline of the curves (not on resume)."""
        if trainer.global_step == 0:
            was_training = pl_module.training
            pl_module.eval()  # no gating noise
            self._record(trainer, pl_module)
            pl_module.train(was_training)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, pl_module)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        if not getattr(model, "moe_layers", None):
            return
        pairs = self._load_pairs(trainer.datamodule)
        if pairs is None:
            return
        images, tokens = pairs
        with torch.no_grad():  # on every rank: expert-parallel layers exchange tokens
            _, _, routings = model.tower(images.to(pl_module.device), tokens.to(pl_module.device))
        if not trainer.is_global_zero:
            return
        layers = {}
        for layer, routing in zip(model.moe_layers, routings):
            summary = layer_summary(routing, MODALITY_NAMES, self.threshold, self.min_share)
            summary.update(
                self._switched(str(layer), routing),
                expert_norm=model.moe_layer(layer).weight_norms(),
            )
            layers[str(layer)] = summary
        self.last = layers
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "layers": layers}) + "\n")

    def _switched(self, layer: str, routing) -> dict:
        first = routing.expert_index[:, 0].cpu()
        previous = self._first_choice.get(layer)
        self._first_choice[layer] = first
        if previous is None or previous.shape != first.shape or routing.modality is None:
            return {"switched": None}
        return {"switched": switched_share(previous, first, routing.modality.cpu())}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        """Only on the steps the logger writes (Lightning's rule: every
        ``log_every_n_steps``-th step, counted from 1), so other steps pay nothing."""
        model = pl_module.model
        every = max(int(trainer.log_every_n_steps), 1)
        if not getattr(model, "moe_layers", None) or (trainer.global_step + 1) % every:
            return
        norms = {}
        for layer in model.moe_layers:
            norm = model.moe_layer(layer).router_grad_norm()
            if norm is not None:
                norms[f"router/layer{layer}_grad_norm"] = norm
        if norms:  # to the host in one transfer
            values = torch.stack(list(norms.values())).tolist()
            pl_module.log_dict(dict(zip(norms, values)), on_step=True)


def routing_metrics(layers: dict[str, dict], names: tuple[str, ...] = MODALITY_NAMES) -> dict:
    """One history record's layers (``layer_summary`` per layer) as flat metrics for
    ``metrics.json``, so ``limoe-compare`` tabulates routing beside accuracy:
    ``routing/layer{l}/{kind}_experts`` (image, text, shared, unused) and, per modality,
    ``routing/layer{l}/{modality}_{busiest_share, entropy_global, entropy_local, dropped,
    gate}``;
    ``routing/{modality}_busiest_share`` is the largest over layers: one expert taking half
    of a modality or more is LIMoE's collapse."""
    metrics: dict[str, float] = {}
    for layer, summary in layers.items():
        prefix = f"routing/layer{layer}"
        for kind, count in summary["specialised"].items():
            metrics[f"{prefix}/{kind}_experts"] = float(count)
        for name in names:
            metrics[f"{prefix}/{name}_busiest_share"] = max(summary["share"][name])
            for key in ("entropy_global", "entropy_local", "dropped", "gate"):
                if key in summary:  # records written before "gate" was kept lack it
                    metrics[f"{prefix}/{name}_{key}"] = float(summary[key][name])
    for name in names:
        shares = [v for k, v in metrics.items() if k.endswith(f"/{name}_busiest_share")]
        if shares:
            metrics[f"routing/{name}_busiest_share"] = max(shares)
    return metrics


def read_history(path: str | Path) -> list[dict]:
    """The records of a ``history.jsonl``, one per step (a resumed run's later record wins),
    sorted by step."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]
