"""The experts: E independent two-layer MLPs held as batched weight tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Experts(nn.Module):
    """E MLPs (fc1 -> act -> drop -> fc2 -> drop, like timm's ``Mlp``) in batched weights.

    Weights are stored as ``w1 [E, dim, hidden]``, ``b1 [E, hidden]``,
    ``w2 [E, hidden, dim]``, ``b2 [E, dim]`` (input-major, so ``x @ w1[e]``) so one
    parameter holds every expert and per-expert slices need no copies. Expert e
    applied to ``x`` equals ``nn.Linear`` with ``weight = w1[e].T``.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm ViT init (trunc normal std .02, zero bias), the same for every expert.

        Done here because model-level ``init_weights`` hooks that visit
        ``nn.Linear`` modules never see these batched parameters.
        """
        for w in (self.w1, self.w2):
            nn.init.trunc_normal_(w, std=0.02)
        for b in (self.b1, self.b2):
            nn.init.zeros_(b)

    def expert_forward(self, x: Tensor, e: int) -> Tensor:
        """Expert e on its tokens ``x [n, dim]``: two GEMMs against slices of the batched weights."""
        h = self.drop(self.act(torch.addmm(self.b1[e], x, self.w1[e])))
        return self.drop(torch.addmm(self.b2[e], h, self.w2[e]))

    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """Run expert e on the e-th contiguous slice of ``x [M, dim]`` (``counts[e]`` rows).

        Outside autocast the input is cast to the weight dtype (e.g. bf16 tokens
        into float32 experts); under autocast the GEMMs pick their own dtype.
        """
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.w1.dtype)
        outs = [
            self.expert_forward(x_e, e)
            for e, x_e in enumerate(torch.split(x, list(counts)))
            if x_e.shape[0] > 0
        ]
        if not outs:
            return x.new_zeros(0, self.w2.shape[-1])
        return torch.cat(outs)
