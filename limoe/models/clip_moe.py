"""The ``clip_moe`` arm: open_clip's two-tower ``CLIP`` with limoe's ``MoELayer`` as the MLP of
image-tower blocks, the text tower dense: sparse experts where MoE-ViE and CLIP-UP put them,
to set against LIMoE's one tower whose experts both modalities share.

Everything but the chosen blocks' MLPs is ``model=clip``'s (``build_clip`` builds both): the
same towers, pooling, initialisation and temperature. Each expert is drawn as the ``nn.Linear``
pair it replaces (PyTorch's default init, which open_clip keeps for the image tower), so at
top-1 the arm runs the FLOPs of ``model=clip`` plus its routers'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from open_clip.model import CLIP
from torch import Tensor, nn

from limoe.models.limoe import IMAGE, moe_mlp
from limoe.moe import MoELayer, Routing


class ImageTokensMoE(nn.Module):
    """A ``MoELayer`` in the place of an open_clip block's MLP: ``[B, L, width]`` tokens in
    and out, routed as one flat set of image tokens (the class token at position -1, the
    patches at 0 .. P-1, as the one tower numbers them). The last call's ``Routing`` is kept
    for the model to collect (open_clip's block takes a tensor back, nothing else)."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer
        self.routing: Routing | None = None

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        token = torch.arange(batch * length, device=x.device)
        sequence, position = token // length, token % length - 1
        modality = torch.full_like(token, IMAGE)
        y, self.routing = self.layer(x.reshape(-1, width), modality, sequence, position)
        return y.view(batch, length, width)


class CLIPMoE(CLIP):
    """open_clip's ``CLIP`` whose image blocks ``moe_layers`` have a ``MoELayer`` MLP (``moe``:
    the config's ``model.moe`` node, as ``model=limoe`` reads it). ``forward`` adds what the
    one tower's does: the summed ``aux_loss`` and the ``routing`` records of the MoE layers
    (the class token routed but left out of the records, as it is no patch)."""

    def __init__(
        self,
        embed_dim: int,
        vision_cfg: dict,
        text_cfg: dict,
        moe_layers: Sequence[int] = (0, 1, 2, 3),
        moe: dict | None = None,
        **clip,
    ) -> None:
        super().__init__(embed_dim, vision_cfg, text_cfg, **clip)
        blocks = self.visual.transformer.resblocks
        moe_layers = sorted(int(i) for i in moe_layers)
        if any(not 0 <= i < len(blocks) for i in moe_layers):
            raise ValueError(f"model.moe_layers must be image-tower block indices in "
                             f"[0, {len(blocks)}), got {moe_layers}")  # fmt: skip
        self.moe_layers = moe_layers
        width, hidden = blocks[0].mlp.c_fc.in_features, blocks[0].mlp.c_fc.out_features
        for i in moe_layers:
            layer = moe_mlp(width, hidden / width, **(moe or {}))
            _init_like_linear(layer.experts)
            blocks[i].mlp = ImageTokensMoE(layer)

    def moe_layer(self, index: int) -> MoELayer:
        """The ``MoELayer`` of image block ``index`` (one of ``moe_layers``)."""
        return self.visual.transformer.resblocks[index].mlp.layer

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    @property
    def patch_size(self) -> int:
        return self.visual.patch_size[0]

    def routings(self) -> list[Routing]:
        """The routing of the last image batch in every MoE layer, the class token marked not
        ``valid`` (statistics and analyses read the patches)."""
        routings = [self.visual.transformer.resblocks[i].mlp.routing for i in self.moe_layers]
        return [replace(r, valid=r.position >= 0) for r in routings]

    def tower(self, images: Tensor, tokens: Tensor | None = None) -> tuple[None, None, list]:
        """Route ``images`` (the text tower has no experts): ``(None, None, routings)``, the
        one tower's ``tower`` as the routing analyses call it."""
        self.encode_image(images)
        return None, None, self.routings()

    def forward(self, image: Tensor | None = None, text: Tensor | None = None):
        out = super().forward(image, text)
        if not self.output_dict or image is None:
            return out
        routings = self.routings()
        out["aux_loss"] = sum((r.aux_loss for r in routings), out["image_features"].new_zeros(()))
        out["routing"] = routings
        return out


def _init_like_linear(experts: nn.Module) -> None:
    """Each expert drawn as ``nn.Linear``'s default init would draw the MLP it replaces:
    weights and biases uniform in +-1/sqrt(fan_in)."""
    for weight, bias in ((experts.w1, experts.b1), (experts.w2, experts.b2)):
        bound = 1 / math.sqrt(weight.shape[1])
        nn.init.uniform_(weight, -bound, bound)
        nn.init.uniform_(bias, -bound, bound)
