"""GShard's one-hot einsum dispatch: the reference the sorted dispatch is tested and
benchmarked against (``MoELayer(dispatch="onehot")``).

Each kept choice becomes a one-hot entry of a dense ``dispatch [N, E, C]`` mask at its
(expert, slot); ``einsum`` packs tokens into per-expert buffers ``[E, C, dim]``, every
expert runs on its whole buffer (empty slots included) with batched GEMMs, and a
gate-weighted ``combine [N, E, C]`` tensor brings the results back. Memory and time grow
with N * E * C, which is why it is not the default path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .experts import Experts


def dispatch_tensors(
    expert_index: Tensor, gates: Tensor, position: Tensor, dropped: Tensor, num_experts: int,
    capacity: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(dispatch [N, E, C] in the gates' dtype, combine [N, E, C]): one entry per kept choice
    at (token, expert, slot position); combine holds its gate."""
    kept = (~dropped).to(gates.dtype)
    expert_hot = F.one_hot(expert_index, num_experts).to(gates.dtype)  # [N, k, E]
    slot = position.clamp(max=max(capacity - 1, 0))
    slot_hot = F.one_hot(slot, max(capacity, 1)).to(gates.dtype)[..., :capacity]  # [N, k, C]
    dispatch = torch.einsum("nk,nke,nkc->nec", kept, expert_hot, slot_hot)
    combine = torch.einsum("nk,nke,nkc->nec", kept * gates, expert_hot, slot_hot)
    return dispatch, combine


def onehot_moe(
    x: Tensor, expert_index: Tensor, gates: Tensor, position: Tensor, dropped: Tensor,
    experts: Experts, capacity: int | None,
) -> Tensor:  # fmt: skip
    """The MoE output ``[N, dim]`` (float32 or wider) by one-hot dispatch; ``capacity=None``
    (dropless) uses the largest slot position in use as the buffer size."""
    if capacity is None:
        capacity = int(position.max()) + 1 if position.numel() else 0
    dispatch, combine = dispatch_tensors(
        expert_index, gates.float(), position, dropped, experts.num_experts, capacity
    )
    dtype = experts.w1.dtype
    buffers = torch.einsum("nec,nd->ecd", dispatch.to(dtype), x.to(dtype))
    hidden = experts.act(torch.baddbmm(experts.b1.unsqueeze(1), buffers, experts.w1))
    out = torch.baddbmm(experts.b2.unsqueeze(1), experts.drop(hidden), experts.w2)
    return torch.einsum("nec,ecd->nd", combine, experts.drop(out).float())
