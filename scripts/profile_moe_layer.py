"""Where the time of one MoE layer call goes: ``torch.profiler`` over forward + backward of
the bf16 layer that ``limoe-bench suite=gpu`` times (E=8, top-1, capacity 1.0, 17,472 tokens
of width 768), next to the dense MLP, with the count of host synchronisations.

    python scripts/profile_moe_layer.py [cuda|cpu] [tokens] [dim]
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from limoe.bench.layer import LayerCase, build_layer, layer_call

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
tokens, dim = (int(a) for a in sys.argv[2:4]) if len(sys.argv) > 3 else (17472, 768)
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
case = LayerCase(num_experts=8, top_k=1, capacity_factor=1.0, tokens=tokens, dim=dim,
                 hidden=4 * dim)  # fmt: skip
torch.manual_seed(0)
x = torch.randn(tokens, dim, device=device)
modality = (torch.arange(tokens, device=device) >= int(0.72 * tokens)).long()
probe = torch.randn(tokens, dim, device=device)
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
for mode in ("dense", "sorted"):
    layer = build_layer(case, mode, {"noisy_gating": False}).to(device)
    call = layer_call(layer, x, modality, probe, True, dtype)
    for _ in range(5):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(10):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "aten::item")
    # Kernel rows only: an operator's row also carries the device time of the kernels it
    # launched, so summing every row counts each kernel twice.
    kernel_rows = [e for e in events if e.device_type.name == "CUDA"]
    kernels = sum(e.count for e in kernel_rows)
    cpu_total = sum(e.self_cpu_time_total for e in events) / 10 / 1e3
    gpu_total = sum(e.self_device_time_total for e in kernel_rows) / 10 / 1e3
    print(
        f"\n### {mode}: per call {cpu_total:.2f} ms of CPU (self), {gpu_total:.2f} ms of GPU "
        f"kernels, {kernels / 10:.0f} kernels, {syncs / 10:.1f} host syncs (item/synchronize)"
    )
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=18, max_name_column_width=48))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))
