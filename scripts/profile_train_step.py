"""Where the time of one training step goes, outside Lightning: forward with the losses,
backward, gradient clipping, the AdamW step and zeroing the gradients, each timed on its own
(median of 12 steps after 3), for each model on the first training batch of its default run;
then, with ``--ops``, ``torch.profiler``'s operators by self time over 5 steps.

    python scripts/profile_train_step.py [limoe dense clip ...] [--ops]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from limoe.data.loading import first_pairs
from limoe.train import build_datamodule, build_module, compose

# limoe-train overrides, e.g. model.moe.experts.gemm=loop
EXTRA = [a for a in sys.argv[1:] if "=" in a]
PARTS = ("forward", "backward", "clip", "step", "zero")


def build(model: str):
    cfg = compose([f"model={model}", "data.num_workers=0", *EXTRA])
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    images, tokens = first_pairs(datamodule.dataset("train"), cfg.data.batch_size)
    return module, module.build_optimizer(), images, tokens


def timed_step(module, optimizer, images, tokens) -> list[float]:
    """Seconds of each of ``PARTS`` in one step."""
    marks = [time.perf_counter()]
    loss = module.compute_loss(images, tokens)[0]
    marks.append(time.perf_counter())
    loss.backward()
    marks.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    marks.append(time.perf_counter())
    optimizer.step()
    marks.append(time.perf_counter())
    optimizer.zero_grad(set_to_none=True)
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    models = [a for a in sys.argv[1:] if not a.startswith("--") and "=" not in a] or ["limoe", "dense"]
    torch.manual_seed(0)
    print("| model | parameters | " + " | ".join(f"{p} ms" for p in PARTS) + " | total ms |")
    print("|---" * (len(PARTS) + 3) + "|")
    for model in models:
        module, optimizer, images, tokens = build(model)
        runs = [timed_step(module, optimizer, images, tokens) for _ in range(15)][3:]
        medians = [1000 * statistics.median(part) for part in zip(*runs)]
        params = sum(p.numel() for p in module.parameters()) / 1e6
        cells = " | ".join(f"{m:.1f}" for m in medians)
        print(f"| {model} | {params:.2f}M | {cells} | {sum(medians):.1f} |")
        if "--ops" in sys.argv:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    timed_step(module, optimizer, images, tokens)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
