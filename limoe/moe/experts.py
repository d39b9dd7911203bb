"""The experts: E independent two-layer MLPs held as batched weight tensors, run on
per-expert contiguous slices of the sorted tokens (one GEMM pair per expert, or one
grouped GEMM for all of them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GEMM_MODES = ("auto", "loop", "grouped", "padded")


def grouped_mm_supported(x: Tensor, *weights: Tensor) -> bool:
    """Whether ``F.grouped_mm`` has a fast kernel here: bf16 on a CUDA GPU of compute
    capability >= 8.0, with every row 16-byte aligned (dims a multiple of 8)."""
    if not hasattr(F, "grouped_mm") or x.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    return all(w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in weights)


@dataclass(frozen=True)
class ExpertShard:
    """Where an ``Experts`` block sits: this is ``rank``'s block of ``world_size`` equal
    blocks, exchanged over the process ``group``."""

    rank: int
    world_size: int
    group: object = None

    def block(self, full: Tensor) -> Tensor:
        """This rank's rows of a tensor holding every expert along dim 0."""
        size = full.shape[0] // self.world_size
        return full[self.rank * size : (self.rank + 1) * size]


class Experts(nn.Module):
    """E MLPs (fc1 -> act -> drop -> fc2 -> drop, like timm's ``Mlp``) in batched weights.

    Weights are stored as ``w1 [E, dim, hidden]``, ``b1 [E, hidden]``,
    ``w2 [E, hidden, dim]``, ``b2 [E, dim]`` (input-major, so ``x @ w1[e]``) so one
    parameter holds every expert and per-expert slices need no copies. Expert e
    applied to ``x`` equals ``nn.Linear`` with ``weight = w1[e].T``.

    ``gemm`` picks how the E GEMMs run: ``loop`` issues one ``addmm`` per non-empty
    expert (fastest on CPU at the default size); ``grouped`` issues one ``F.grouped_mm`` per
    weight for all experts (one kernel on a GPU, no host sync on the counts); ``padded``
    copies each expert's slice into an ``[E, C, dim]`` buffer padded to the largest slice
    ``C`` and runs one ``baddbmm`` per weight (fewer, larger GEMMs: on 2 CPU cores it wins
    only for tiny experts, e.g. width 32 at 125 tokens each, and loses at width 96 and up:
    docs/benchmarks.md); ``auto`` takes ``grouped`` where ``grouped_mm_supported`` (CUDA,
    bf16 under autocast or in bf16) and ``loop`` elsewhere.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        gemm: str = "auto",
    ) -> None:
        super().__init__()
        if gemm not in GEMM_MODES:
            raise ValueError(f"gemm must be one of {GEMM_MODES}, got {gemm!r}")
        self.num_experts = num_experts  # in the whole layer
        self.num_local_experts = num_experts  # held by this process (fewer once sharded)
        self.gemm = gemm
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        # Set by ``parallel.shard_experts`` once this process keeps only its block of the
        # experts; None: all experts are here.
        self.parallel: ExpertShard | None = None
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

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """Run expert e on the e-th contiguous slice of ``x [M, dim]`` (``counts[e]`` rows).

        Outside autocast the input is cast to the weight dtype (e.g. bf16 tokens
        into float32 experts); under autocast the GEMMs pick their own dtype.
        """
        path = self.gemm_path(x, counts)
        if path == "grouped":
            return self.forward_grouped(x, counts)
        if path == "padded":
            return self.forward_padded(x, counts)
        return self.forward_loop(x, counts)

    def gemm_path(self, x: Tensor, counts: Tensor) -> str:
        """``loop``, ``grouped`` or ``padded``: the ``gemm`` mode, ``auto`` resolved for
        ``x`` and the slice sizes ``counts``."""
        if x.shape[0] == 0:
            return "loop"
        if self.gemm != "auto":
            return self.gemm
        return "grouped" if self.use_grouped(x) else "loop"

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The GEMMs' dtype: autocast's where it is on, the weights' otherwise."""
        device = x.device.type
        return (
            torch.get_autocast_dtype(device)
            if torch.is_autocast_enabled(device)
            else (self.w1.dtype)
        )

    def use_grouped(self, x: Tensor) -> bool:
        if self.gemm != "auto":
            return self.gemm == "grouped"
        bf16 = self.compute_dtype(x) == torch.bfloat16
        return bf16 and grouped_mm_supported(x, self.w1, self.w2)

    def forward_loop(self, x: Tensor, counts: Tensor) -> Tensor:
        """One ``addmm`` pair per non-empty expert.

        The weights are ``unbind``-ed once, so backward stacks the E weight gradients in
        one step; indexing ``w1[e]`` instead would give each expert's gradient as a
        zero-filled ``[E, dim, hidden]`` tensor to be summed, E times the memory traffic.
        """
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.w1.dtype)
        w1, b1, w2, b2 = (p.unbind(0) for p in (self.w1, self.b1, self.w2, self.b2))
        outs = []
        for e, x_e in enumerate(torch.split(x, counts.tolist())):
            if x_e.shape[0] > 0:
                h = self.drop(self.act(torch.addmm(b1[e], x_e, w1[e])))
                outs.append(self.drop(torch.addmm(b2[e], h, w2[e])))
        if not outs:
            return x.new_zeros(0, self.w2.shape[-1])
        return torch.cat(outs)

    def forward_padded(self, x: Tensor, counts: Tensor) -> Tensor:
        """Both layers as one ``baddbmm`` over ``[E, C, dim]``, each expert's slice copied to
        the start of its row block and padded with zeros to the largest slice ``C``; the
        padding rows are computed and never read back (no gradient reaches them)."""
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.w1.dtype)
        experts, rows = counts.shape[0], x.shape[0]
        size = int(counts.max())
        expert = torch.repeat_interleave(
            torch.arange(experts, device=x.device), counts, output_size=rows
        )
        starts = torch.cumsum(counts, dim=0) - counts
        slot = expert * size + torch.arange(rows, device=x.device) - starts[expert]
        padded = x.new_zeros(experts * size, x.shape[1]).index_copy(0, slot, x)
        h = torch.baddbmm(self.b1.unsqueeze(1), padded.view(experts, size, -1), self.w1)
        out = torch.baddbmm(self.b2.unsqueeze(1), self.drop(self.act(h)), self.w2)
        return self.drop(out.view(experts * size, -1)[slot])

    def forward_grouped(self, x: Tensor, counts: Tensor) -> Tensor:
        """Both layers as ``F.grouped_mm`` over the slices (offsets = cumulative counts).

        Under autocast, operands take the autocast dtype (``grouped_mm`` is not on the
        autocast lists); per-expert biases are expanded row by row, since ``grouped_mm``'s
        own ``bias`` is one vector for every group.
        """
        dtype = self.compute_dtype(x)
        offs = torch.cumsum(counts, dim=0).to(torch.int32)
        rows = x.shape[0]
        w1, b1, w2, b2 = (p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = F.grouped_mm(x.to(dtype), w1, offs=offs)
            h = h + torch.repeat_interleave(b1, counts, dim=0, output_size=rows)
            h = self.drop(self.act(h))
            out = F.grouped_mm(h, w2, offs=offs)
            out = out + torch.repeat_interleave(b2, counts, dim=0, output_size=rows)
        return self.drop(out)
