"""The experts: E independent two-layer MLPs held as batched weight tensors, run on
per-expert contiguous slices of the sorted tokens (one GEMM pair per expert, or one
grouped GEMM for all of them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import ExpertBias

GEMM_MODES = ("auto", "loop", "grouped", "padded")


def grouped_mm_supported(x: Tensor, dtype: torch.dtype, *weights: Tensor) -> bool:
    """Whether ``F.grouped_mm`` runs on ``x``'s GPU in ``dtype`` without a host
    synchronisation: CUDA's grouped-GEMM kernel, bf16 on compute capability 9.0 and up
    (Hopper, Blackwell) with every row 16-byte aligned (dims a multiple of 8); on other GPUs
    PyTorch copies the offsets to the host and loops. (A CPU takes the loop: ``gemm_path``.)"""
    if not hasattr(F, "grouped_mm") or x.device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
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

    ``gemm`` picks how the E GEMMs run: ``grouped`` issues one ``F.grouped_mm`` per weight
    for all experts (CUDA's grouped-GEMM kernel in bf16 on Hopper and later; no host sync on
    the counts); ``padded`` runs one ``baddbmm`` per weight over the ``[E, C, dim]`` capacity
    buffer (needs a capacity; no host sync, and no grouped kernel needed); ``loop`` issues one
    ``addmm`` per non-empty expert on slices cut on the host; ``auto`` takes the first of
    these that runs without a host synchronisation here (``gemm_path``).
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

    def reset_parameters(
        self, std_in: float = 0.02, std_out: float = 0.02, truncated: bool = True
    ) -> None:
        """Every expert's weights drawn as one ``nn.Linear``'s would be: ``w1`` with std
        ``std_in``, ``w2`` with ``std_out`` (timm's ViT init by default: trunc normal of std
        0.02), zero biases. A model's own init calls it with its stds: model-level hooks that
        visit ``nn.Linear`` modules never see these batched parameters."""
        draw = nn.init.trunc_normal_ if truncated else nn.init.normal_
        draw(self.w1, std=std_in)
        draw(self.w2, std=std_out)
        for b in (self.b1, self.b2):
            nn.init.zeros_(b)

    def forward(
        self, rows: Tensor, offsets: Tensor, path: str = "loop", every_row_kept: bool = False,
        row_expert: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Run expert e on rows ``offsets[e - 1]:offsets[e]`` of ``rows [M, dim]`` (sorted by
        expert; rows past ``offsets[-1]`` belong to no expert and come out unspecified, for
        the caller to mask). ``path`` is ``loop`` or ``grouped`` (``gemm_path``);
        ``every_row_kept``: no row lies past the last offset (dropless routing);
        ``row_expert [M]``: each row's expert (E past the last offset) where the caller has it
        already (the sort's keys), else the grouped path finds it from the offsets.

        Outside autocast the input is cast to the weight dtype (e.g. bf16 tokens
        into float32 experts); under autocast the GEMMs pick their own dtype.
        """
        if path == "grouped":
            return self.forward_grouped(rows, offsets, every_row_kept, row_expert)
        return self.forward_loop(rows, offsets)

    def gemm_path(self, x: Tensor, capacity: int | None) -> str:
        """``loop``, ``grouped`` or ``padded`` for tokens like ``x``: the ``gemm`` mode, or for
        ``auto`` on a GPU the fastest path with no host synchronisation where one exists:
        PyTorch's grouped GEMM where it has a kernel for this dtype (``grouped_mm_supported``),
        else at a capacity the padded ``[E, C]`` buffer, else the loop (which reads the row
        counts on the host). On a CPU, where reading the counts waits for nothing, the loop:
        its ``addmm`` carries the bias and it leaves no row to mask, which measures faster
        than the grouped path there (docs/benchmarks.md); compiled in bf16, the grouped GEMM,
        so that the graph has no break."""
        if self.gemm != "auto":
            return self.gemm
        if x.device.type == "cpu":  # host memory: the loop's reads wait for nothing
            compiled_bf16 = (
                torch.compiler.is_compiling() and self.compute_dtype(x) == torch.bfloat16
            )
            return "grouped" if compiled_bf16 else "loop"
        if grouped_mm_supported(x, self.compute_dtype(x), self.w1, self.w2):
            return "grouped"
        return "loop" if capacity is None else "padded"

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The GEMMs' dtype: autocast's where it is on, the weights' otherwise."""
        device = x.device.type
        return (
            torch.get_autocast_dtype(device)
            if torch.is_autocast_enabled(device)
            else (self.w1.dtype)
        )

    @torch.compiler.disable  # data-dependent slices: compiled, they would recompile each step
    def forward_loop(self, rows: Tensor, offsets: Tensor) -> Tensor:
        """One ``addmm`` pair per non-empty expert, on slices cut on the host (``tolist``: a
        device synchronisation on a GPU, free on a CPU, where the counts are in host memory).

        The weights are ``unbind``-ed once, so backward stacks the E weight gradients in
        one step; indexing ``w1[e]`` instead would give each expert's gradient as a
        zero-filled ``[E, dim, hidden]`` tensor to be summed, E times the memory traffic.
        """
        x = rows if torch.is_autocast_enabled(rows.device.type) else rows.to(self.w1.dtype)
        ends = offsets.tolist()
        sizes = [b - a for a, b in zip([0, *ends[:-1]], ends)] + [x.shape[0] - ends[-1]]
        w1, b1, w2, b2 = (p.unbind(0) for p in (self.w1, self.b1, self.w2, self.b2))
        outs = []
        # split, not slicing: its backward is one concatenation, where each slice's would be a
        # zero-filled gradient of every row
        *slices, dropped = torch.split(x, sizes)
        for e, x_e in enumerate(slices):
            if x_e.shape[0] > 0:
                h = self.drop(self.act(torch.addmm(b1[e], x_e, w1[e])))
                outs.append(self.drop(torch.addmm(b2[e], h, w2[e])))
        if dropped.shape[0] or not outs:  # the dropped rows: zeros
            dtype = outs[0].dtype if outs else x.dtype
            outs.append(x.new_zeros(dropped.shape[0], self.w2.shape[-1], dtype=dtype))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward_padded(self, buffer: Tensor) -> Tensor:
        """Both layers as one ``baddbmm`` over the ``[E, C, dim]`` capacity buffer (empty slots
        are zeros, computed and never read back). The biases' gradients are sums over C."""
        if not torch.is_autocast_enabled(buffer.device.type):
            buffer = buffer.to(self.w1.dtype)
        h = torch.baddbmm(self.b1.unsqueeze(1), buffer, self.w1)
        return self.drop(torch.baddbmm(self.b2.unsqueeze(1), self.drop(self.act(h)), self.w2))

    def forward_grouped(
        self, rows: Tensor, offsets: Tensor, every_row_kept: bool = False,
        row_expert: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Both layers as ``F.grouped_mm`` over the slices (int32 offsets), no host sync.

        Under autocast, operands take the autocast dtype (``grouped_mm`` is not on the
        autocast lists). ``grouped_mm``'s own ``bias`` is one vector for every group, so each
        row gets its expert's bias from ``ExpertBias`` (a gather whose gradient is a GEMM).
        Rows past the last offset are left uninitialised by ``grouped_mm``, in the output and
        in the input's gradient: unless ``every_row_kept`` (dropless: there are none),
        ``where`` zeroes them before the activation, both ways.
        """
        dtype = self.compute_dtype(rows)
        offs = offsets.to(torch.int32)
        expert = row_expert
        if expert is None:  # E past the last offset
            positions = torch.arange(rows.shape[0], device=rows.device)
            expert = torch.searchsorted(offsets, positions, right=True)
        w1, b1, w2, b2 = (p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        with torch.autocast(device_type=rows.device.type, enabled=False):
            h = ExpertBias.apply(F.grouped_mm(rows.to(dtype), w1, offs=offs), b1, expert)
            if not every_row_kept:
                h = torch.where((expert < offsets.shape[0]).unsqueeze(1), h, 0)
            h = self.drop(self.act(h))
            out = ExpertBias.apply(F.grouped_mm(h, w2, offs=offs), b2, expert)
        return self.drop(out)
