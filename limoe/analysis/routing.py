"""Which experts take which tokens: run a model over held-out pairs, keep every MoE layer's
routing record together with where each token came from (pair, patch or word position) and
what it shows, and reduce that to tables.

Image and text tokens are routed together, as in training (``model.tower(images, tokens)``),
so capacity and Batch Priority Routing see the same mixed token set they saw when training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from limoe.data.loading import collate_pairs
from limoe.models.limoe import IMAGE, TEXT
from limoe.moe import Routing
from limoe.moe.statistics import MODALITY_NAMES, concat_routings, layer_summary

IMAGE_GROUPS = ("shape", "edge", "background")
# Token roles of the embedded datasets' captions (shapes: size ... background; scenes:
# colour, shape, relation), then template words and the start and end tokens.
TEXT_GROUPS = (
    "size", "colour", "shape", "position", "relation", "background", "other", "start/end",
)  # fmt: skip
CONTENT_GROUPS = tuple(f"image/{g}" for g in IMAGE_GROUPS) + tuple(f"text/{g}" for g in TEXT_GROUPS)


@dataclass
class RoutingRecord:
    """Every token of ``num_pairs`` pairs and what each MoE layer did with it.

    Token order is the tower's: per batch, all image patches (pair-major, patch order), then
    the real (unpadded) text tokens (pair-major, position order). ``pair`` and ``position``
    are the routing records' own (``Routing.sequence``, offset by the batch's first pair, and
    ``Routing.position``).
    """

    layers: list[int]  # the MoE blocks' indices in the tower
    routings: list[Routing]  # one per layer, all tokens, on the CPU
    modality: Tensor  # [N] IMAGE or TEXT
    pair: Tensor  # [N] the dataset index of the token's pair
    position: Tensor  # [N] patch index (image) or token position (text)
    token_id: Tensor  # [N] open_clip token id (text), -1 (image)
    grid_size: tuple[int, int]  # image patches per column and row
    patch_size: int

    @property
    def pairs(self) -> list[int]:
        """The dataset indices of the routed pairs, sorted."""
        return self.pair.unique().tolist()

    @property
    def num_experts(self) -> int:
        return self.routings[0].probs.shape[1]

    def routing(self, layer: int) -> Routing:
        return self.routings[self.layers.index(layer)]

    def summaries(self, threshold: float = 0.9, min_share: float = 0.01) -> dict[int, dict]:
        """``layer_summary`` of every MoE layer, keyed by layer index."""
        return {
            layer: layer_summary(r, MODALITY_NAMES, threshold, min_share)
            for layer, r in zip(self.layers, self.routings)
        }

    def first_choice(self, layer: int) -> Tensor:
        """[N] each token's first-choice expert, or -1 where that choice was dropped."""
        routing = self.routing(layer)
        return routing.expert_index[:, 0].masked_fill(routing.dropped[:, 0], -1)

    def first_gate(self, layer: int) -> Tensor:
        """[N] the gate of each token's first choice (0 where it was dropped)."""
        routing = self.routing(layer)
        return routing.gates[:, 0].masked_fill(routing.dropped[:, 0], 0.0)


@torch.no_grad()
def collect_routing(
    model: torch.nn.Module,
    dataset,
    num_pairs: int = 1000,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> RoutingRecord:
    """Route the first ``num_pairs`` pairs of ``dataset`` (items ``(image, tokens, ...)``)
    through ``model`` in eval mode and gather the routing of every MoE layer."""
    if not getattr(model, "moe_layers", None):
        raise ValueError("the model has no MoE layers: there is no routing to analyse")
    num_pairs = min(num_pairs, len(dataset))
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1 and the dataset non-empty, got {num_pairs}")
    was_training = model.training
    model.eval().to(device)
    per_layer: list[list[Routing]] = [[] for _ in model.moe_layers]
    token_ids: list[Tensor] = []
    starts = range(0, num_pairs, batch_size)
    for start in tqdm(starts, desc="routing", unit="batch", disable=not progress):
        images, tokens = collate_pairs(dataset, range(start, min(start + batch_size, num_pairs)))
        _, _, routings = model.tower(images.to(device), tokens.to(device))
        for records, routing in zip(per_layer, routings):
            records.append(routing.record("cpu", sequence_offset=start))
        token_ids.append(_token_ids(per_layer[0][-1], tokens, start))
    model.train(was_training)
    routings = [concat_routings(records) for records in per_layer]
    first = routings[0]  # every layer routes the same tokens in the same order
    return RoutingRecord(
        layers=list(model.moe_layers),
        routings=routings,
        modality=first.modality,
        pair=first.sequence,
        position=first.position,
        token_id=torch.cat(token_ids),
        grid_size=tuple(model.grid_size),
        patch_size=model.patch_size,
    )


def _token_ids(routing: Routing, tokens: Tensor, first_pair: int) -> Tensor:
    """[N] the open_clip token id of each text token of one batch's record (its sequences
    offset by ``first_pair``), -1 for patches."""
    text = routing.modality == TEXT
    ids = torch.full_like(routing.position, -1)
    ids[text] = tokens[routing.sequence[text] - first_pair, routing.position[text]]
    return ids


# --------------------------------------------------------------------------- content


def patch_coverage(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """[num_patches] the fraction of each patch's pixels that ``mask`` [H, W] covers,
    in the patch embedding's row-major order."""
    h, w = mask.shape
    blocks = mask.reshape(h // patch_size, patch_size, w // patch_size, patch_size)
    return blocks.mean(axis=(1, 3)).reshape(-1)


def image_group(coverage: float) -> str:
    """A patch at least half on the shape is ``shape``, one partly on it ``edge``."""
    return "shape" if coverage >= 0.5 else "edge" if coverage > 0 else "background"


def content_groups(record: RoutingRecord, dataset) -> list[str]:
    """Each token's content group (``CONTENT_GROUPS``): patches by how much of the objects
    they cover, caption tokens by what they name. ``dataset`` is one of the embedded datasets,
    which say both (``object_mask(i)``, ``caption_roles(i)``)."""
    groups: list[str] = []
    pair_groups: dict[int, tuple[list[str], list[str]]] = {}
    for modality, pair, position in zip(
        record.modality.tolist(), record.pair.tolist(), record.position.tolist()
    ):
        if pair not in pair_groups:
            pair_groups[pair] = _pair_groups(dataset, pair, record.patch_size)
        image, text = pair_groups[pair]
        groups.append(f"image/{image[position]}" if modality == IMAGE else f"text/{text[position]}")
    return groups


def _pair_groups(dataset, index: int, patch_size: int) -> tuple[list[str], list[str]]:
    coverage = patch_coverage(dataset.object_mask(index), patch_size)
    return [image_group(c) for c in coverage], dataset.caption_roles(index)


def content_table(
    record: RoutingRecord, layer: int, groups: Sequence[str], names: Sequence[str] = CONTENT_GROUPS
) -> np.ndarray:
    """[len(names), num_experts]: the share of each group's kept choices that each expert
    took (rows sum to 1 minus the group's dropped share; an empty group's row is 0)."""
    routing = record.routing(layer)
    row = torch.tensor([names.index(g) for g in groups])
    kept = ~routing.dropped
    rows = row.unsqueeze(1).expand_as(routing.expert_index)[kept]
    flat = rows * record.num_experts + routing.expert_index[kept]
    counts = torch.bincount(flat, minlength=len(names) * record.num_experts).view(len(names), -1)
    choices = torch.bincount(row, minlength=len(names)) * routing.expert_index.shape[1]
    return (counts.double() / choices.clamp(min=1).unsqueeze(1)).numpy()


# --------------------------------------------------------------------------- examples


def patch_experts(record: RoutingRecord, layer: int, pairs: Sequence[int]) -> np.ndarray:
    """[len(pairs), rows, cols] each patch's first-choice expert (-1: dropped)."""
    choice = record.first_choice(layer)
    rows, cols = record.grid_size
    out = np.full((len(pairs), rows * cols), -1, dtype=np.int64)
    is_image = record.modality == IMAGE
    for i, pair in enumerate(pairs):
        take = is_image & (record.pair == pair)
        out[i, record.position[take].numpy()] = choice[take].numpy()
    return out.reshape(len(pairs), rows, cols)


def word_experts(record: RoutingRecord, layer: int, pair: int) -> tuple[list[int], list[int]]:
    """(token ids, first-choice experts) of one pair's caption, in position order."""
    take = (record.modality == TEXT) & (record.pair == pair)
    order = record.position[take].argsort()
    return record.token_id[take][order].tolist(), record.first_choice(layer)[take][order].tolist()


@dataclass
class PairRouting:
    """What one MoE layer did with one pair's tokens (first choices), for the explorer."""

    pair: int
    layer: int
    patch_expert: np.ndarray  # [rows, cols] expert of each patch, -1 = dropped
    patch_gate: np.ndarray  # [rows, cols] its gate (0 = dropped)
    token_ids: list[int]  # the caption's tokens, in position order
    word_expert: list[int]  # the expert of each, -1 = dropped
    word_gate: list[float]  # its gate
    image_share: list[float | None]  # per expert: share of its tokens that are image patches


def pair_routing(
    record: RoutingRecord, layer: int, pair: int, image_share: Sequence[float | None]
) -> PairRouting:
    """One pair at one layer; ``image_share`` is the layer's ``modality_fraction["image"]``
    over every routed pair (``RoutingRecord.summaries``)."""
    if pair not in record.pairs:
        raise ValueError(f"pair {pair} was not routed (the record holds pairs {record.pairs})")
    if layer not in record.layers:
        raise ValueError(f"layer {layer} is not a MoE layer (MoE layers: {record.layers})")
    rows, cols = record.grid_size
    gate = record.first_gate(layer)
    is_image = (record.modality == IMAGE) & (record.pair == pair)
    patch_gate = np.zeros(rows * cols, dtype=np.float32)
    patch_gate[record.position[is_image].numpy()] = gate[is_image].numpy()
    token_ids, word_expert = word_experts(record, layer, pair)
    is_text = (record.modality == TEXT) & (record.pair == pair)
    word_gate = gate[is_text][record.position[is_text].argsort()].tolist()
    return PairRouting(
        pair=pair,
        layer=layer,
        patch_expert=patch_experts(record, layer, [pair])[0],
        patch_gate=patch_gate.reshape(rows, cols),
        token_ids=token_ids,
        word_expert=word_expert,
        word_gate=word_gate,
        image_share=list(image_share),
    )
