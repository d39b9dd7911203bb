"""A host-synchronisation counter that works on a CPU: every operation that would make the host
wait for a GPU, recorded with the Python line that asked for it.

On a GPU ``torch.cuda.set_sync_debug_mode("error")`` catches synchronisations as they happen;
CI has no GPU, so this looks for their causes instead, at the dispatcher
(``TorchDispatchMode``): reading a value on the host (``_local_scalar_dense``: ``item``,
``bool``, ``int``, ``float``), operations whose output size depends on values (``nonzero``,
``bincount``, ``unique``, ``masked_select``, boolean indexing, ``repeat_interleave`` without
``output_size``), plus the Python-level reads that never reach the dispatcher on a CPU
(``Tensor.tolist``, ``numpy``, ``cpu``).
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.bincount.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.masked_select.default,
}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default}  # fmt: skip
REPEAT_OPS = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
HOST_READS = ("tolist", "numpy", "cpu")


@dataclass
class Syncs:
    """What was caught: one ``(what, where)`` per synchronisation, where is the innermost line
    of the project (``limoe/``) that led to it, else the innermost line."""

    events: list[tuple[str, str]] = field(default_factory=list)

    def add(self, what: str) -> None:
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if "/limoe/" in f.filename and "sync_counter" not in f.filename]
        frame = (ours or stack)[-1]
        self.events.append((what, f"{frame.filename.split('/limoe/')[-1]}:{frame.lineno}"))

    def __len__(self) -> int:
        return len(self.events)

    def summary(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for event in self.events:
            counts[event] = counts.get(event, 0) + 1
        return "\n".join(f"{n}x {what} at {where}" for (what, where), n in counts.items())


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class _Mode(TorchDispatchMode):
    def __init__(self, syncs: Syncs) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.syncs.add(str(func))
        elif func in INDEX_OPS and _bool_index(args[1]):
            self.syncs.add(f"{func} with a boolean index")
        elif func in REPEAT_OPS and kwargs.get("output_size") is None:
            self.syncs.add(f"{func} without output_size")
        return func(*args, **kwargs)


@contextmanager
def count_syncs():
    """``with count_syncs() as syncs: ...``; then ``len(syncs)`` and ``syncs.summary()``."""
    syncs = Syncs()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def hook(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            syncs.add(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, hook(name))
    try:
        with _Mode(syncs):
            yield syncs
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
