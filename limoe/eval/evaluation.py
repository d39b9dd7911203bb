"""One stage's evaluation of a model over an ``EvalPlan``: encode every batch, gather the
features of each loader from every process, then compute retrieval and zero-shot metrics over
the whole split (open_clip's metrics, computed once per split rather than averaged per batch).

A batch of image-text pairs is encoded by one forward pass over both modalities, as in
training: a one-tower MoE routes image and text tokens together, so with a finite expert
capacity the routing (and what is dropped) is the routing the model was trained with.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from limoe.eval.plan import EvalPlan
from limoe.eval.retrieval import retrieval_metrics
from limoe.eval.zeroshot import topk_accuracy, zeroshot_classifier

Gather = Callable[[dict[str, Tensor]], dict[str, Tensor]]


class Evaluation:
    """Built at the start of a stage (the zero-shot classifiers embed the prompts with the
    weights as they are then); ``add`` each batch; ``compute`` at the end."""

    def __init__(self, model: nn.Module, plan: EvalPlan) -> None:
        self.model, self.plan = model, plan
        self.classifiers = {
            name: zeroshot_classifier(model, plan.tokenizer, task.classnames, task.templates)
            for name, task in plan.tasks.items()
        }
        self.features: dict[int, list[dict[str, Tensor]]] = defaultdict(list)

    def add(self, batch: dict[str, Tensor], loader: int = 0) -> None:
        features = {"index": batch["index"], "valid": batch["valid"]}
        if "text" in batch:
            features["image"], features["text"] = encode_pairs(
                self.model, batch["image"], batch["text"]
            )
        else:
            features["image"] = self.model.encode_image(batch["image"], normalize=True)
        if "labels" in batch:
            features["labels"] = batch["labels"]
        self.features[loader].append(features)

    def compute(self, all_gather: Gather | None = None) -> dict[str, float]:
        """``{prefix}/{metric}`` of every loader that saw batches. ``all_gather`` stacks a
        dict of tensors from every process (``[world_size, ...]``); None on one process."""
        metrics = {}
        for loader, batches in sorted(self.features.items()):
            eval_set = self.plan.sets[loader]
            features = gather_split(batches, all_gather)
            found = {}
            if "text" in features:
                scale = self.model.logit_scale.detach().exp()
                found.update(retrieval_metrics(features["image"], features["text"], scale))
            for column, task in enumerate(eval_set.tasks):
                logits = features["image"].float() @ self.classifiers[task.name].float()
                top = topk_accuracy(logits, features["labels"][:, column], ks=(1, 5))
                found[f"{task.name}_zeroshot_top1"] = top[1]
                found[f"{task.name}_zeroshot_top5"] = top[5]
            metrics.update({f"{eval_set.prefix}/{k}": v for k, v in found.items()})
        return metrics


def encode_pairs(model: nn.Module, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised image and text features of paired batches from one ``forward`` (open_clip's
    ``CLIP`` and ``LIMoE`` both return normalised features, as a dict or a tuple)."""
    out = model(images, tokens)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"]
    return out[0], out[1]


def gather_split(batches: list[dict[str, Tensor]], all_gather: Gather | None) -> dict[str, Tensor]:
    """One loader's features from every process, each sample once, in dataset order and
    without the samples whose image could not be read. DDP's sampler gives every process the
    same number of samples, repeating some to do so; the sample index removes the repeats."""
    local = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    if all_gather is not None:
        local["valid"] = local["valid"].long()
        local = {k: v.flatten(0, 1) for k, v in all_gather(local).items()}
    index = local["index"]
    order = torch.zeros(int(index.max()) + 1, dtype=torch.long, device=index.device)
    order[index] = torch.arange(len(index), device=index.device)
    keep = order[local["valid"][order].bool()]
    return {key: value[keep] for key, value in local.items()}
