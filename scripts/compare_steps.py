"""One model's training computation under several configs, timed in one process: forward (CLIP
and auxiliary losses) and backward of the first batch of its default run, the variants' steps
interleaved so that the machine's slow spells fall on all of them. The first two steps of each
are timed apart (for ``model.compile=true``, the compile time, from a fresh inductor cache);
then the median of 10 steps after 2 more.

    python scripts/compare_steps.py MODEL VARIANT [VARIANT ...]
    python scripts/compare_steps.py limoe model.moe.experts.gemm=loop model.moe.experts.gemm=grouped
    python scripts/compare_steps.py dense model.compile=false model.compile=true

A variant is a comma-separated list of limoe-train overrides.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="limoe-inductor-"))

import torch  # noqa: E402

from limoe.data.loading import first_pairs  # noqa: E402
from limoe.train import build_datamodule, build_module, compose  # noqa: E402


def step(module, images, tokens) -> float:
    start = time.perf_counter()
    module.compute_loss(images, tokens)[0].backward()
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    model, variants = sys.argv[1], sys.argv[2:]
    cfg = compose([f"model={model}", "data.num_workers=0"])
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    images, tokens = first_pairs(datamodule.dataset("train"), cfg.data.batch_size)
    modules, first = {}, {}
    for variant in variants:
        torch.manual_seed(0)
        modules[variant] = build_module(compose([f"model={model}", *variant.split(",")]))
        first[variant] = sum(step(modules[variant], images, tokens) for _ in range(2))
    times = {variant: [] for variant in variants}
    for i in range(12):
        for variant in variants:
            seconds = step(modules[variant], images, tokens)
            if i >= 2:
                times[variant].append(seconds)
    print(f"| {model} | first 2 steps s | step ms (median of 10) |\n|---|---|---|")
    for variant in variants:
        median = statistics.median(times[variant]) * 1e3
        print(f"| {variant} | {first[variant]:.1f} | {median:.1f} |")


if __name__ == "__main__":
    main()
