"""The one-shot GPU check (``limoe-bench suite=gpu device=cuda``, ``make gpu-check``): the MoE
layer in bf16 against a dense MLP with both expert GEMM paths, a run of training steps per
model on synthetic pairs (pairs/s, peak memory, finite loss), and DDP over every GPU when
there are several. On CPU the same code runs as a dry run at whatever size it is given.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from limoe.runs import read_metrics

from .layer import run_layer_bench
from .step import training_step
from .timing import synchronize


def synthetic_pairs(
    batch_size: int,
    image_size: int,
    context_length: int,
    vocab_size: int = 49408,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Random images and token rows shaped as the tokenizer's: start token, words, end-of-text
    (the largest id, which the models' pooling looks for) at a random length, zero padding."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    tokens = torch.zeros(batch_size, context_length, dtype=torch.long)
    lengths = torch.randint(2, context_length + 1, (batch_size,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        tokens[row, :length] = torch.randint(1, vocab_size - 2, (length,), generator=generator)
        tokens[row, 0], tokens[row, length - 1] = vocab_size - 2, vocab_size - 1
    return images.to(device), tokens.to(device)


def run_gemm_layer_bench(
    gemms: Sequence[str], layer_kwargs: Mapping, moe: Mapping,
    compiled: Sequence[bool] = (False,),
) -> list[dict]:  # fmt: skip
    """The MoE layer (sorted dispatch) with each expert GEMM path, every case timed next to its
    own dense MLP; rows as ``run_layer_bench``'s with ``mode`` ``sorted-<gemm>``, and the
    dense rows of the first path only. For ``compiled`` True, the first path compiled (each
    compile takes tens of seconds: one path keeps the check short), with modes ending
    ``-compiled`` and ratios to the compiled dense MLP."""
    rows = []
    for compile in compiled:
        suffix = "-compiled" if compile else ""
        for i, gemm in enumerate(gemms[:1] if compile else gemms):
            found = run_layer_bench(modes=("dense", "sorted"), compile=compile,
                                    moe=_with_gemm(moe, gemm), **layer_kwargs)  # fmt: skip
            for row in found:
                if row["mode"] == "sorted":
                    rows.append({**row, "mode": f"sorted-{gemm}{suffix}"})
                elif i == 0:
                    rows.append({**row, "mode": f"dense{suffix}"})
    return rows


def _with_gemm(moe: Mapping, gemm: str) -> dict:
    """The layer options ``moe`` (``router``, ``experts``, ``losses``) with the experts' GEMM
    path set to ``gemm``."""
    return {**moe, "experts": {**moe.get("experts", {}), "gemm": gemm}}


def time_steps(
    step: Callable[[], Tensor], warmup: int, steps: int, device: torch.device, progress: bool,
    desc: str,
) -> dict:  # fmt: skip
    """``steps`` timed calls of ``step`` after ``warmup``: seconds, peak GPU memory in GiB
    (None on CPU) and whether every loss was finite."""
    losses = [step() for _ in range(warmup)]
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        losses.append(step())
    synchronize(device)
    seconds = time.perf_counter() - start
    values = torch.stack(losses).float().cpu()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": seconds, "peak_memory_gib": peak, "final_loss": values[-1].item(),
            "losses_finite": bool(torch.isfinite(values).all())}  # fmt: skip


def run_model_steps(
    modules: Mapping[str, tuple[nn.Module, int, int, int]],
    batch_size: int,
    warmup: int,
    steps: int,
    device: str | torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """For each ``name: (module, image_size, context_length, vocab_size)``: ``steps`` AdamW
    steps on one synthetic batch; pairs/s, peak memory, the last loss, and pairs/s as a
    fraction of the dense one-tower of the same size (``limoe_b32`` -> ``dense_b32``)."""
    device = torch.device(device)
    rows = []
    for name, (module, image_size, context_length, vocab) in modules.items():
        images, tokens = synthetic_pairs(batch_size, image_size, context_length, vocab, device,
                                         seed)  # fmt: skip
        module.to(device).train()
        step = training_step(module, images, tokens, dtype)
        found = time_steps(step, warmup, steps, device, progress, f"limoe-bench gpu {name}")
        del step  # and its optimiser state
        module.cpu()
        rows.append({"model": name, "batch_size": batch_size, "steps": steps, **found,
                     "pairs_per_s": batch_size * steps / found["seconds"]})  # fmt: skip
    rate = {r["model"]: r["pairs_per_s"] for r in rows}
    for row in rows:
        twin = "dense" + row["model"].removeprefix("limoe")
        row["pairs_per_s_vs_dense"] = rate[row["model"]] / rate[twin] if twin in rate else None
    return rows


def sync_free_step(step: Callable[[], Tensor], device: torch.device) -> dict:
    """One training step under CUDA's sync debug mode at ``error``: any operation that makes
    the host wait for the GPU raises. ``sync_free`` None on a CPU (nothing to wait for)."""
    if device.type != "cuda":
        return {"sync_free": None, "error": None}
    step()  # warm: first calls allocate and autotune
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return {"sync_free": True, "error": None}
    except RuntimeError as error:
        return {"sync_free": False, "error": str(error).strip().splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)


class _LayerTensors(nn.Module):
    """A MoE layer returning tensors only, ``(y, aux_loss)``, as graph capture needs."""

    def __init__(self, layer: nn.Module, modality: Tensor, valid: Tensor) -> None:
        super().__init__()
        self.layer, self.modality, self.valid = layer, modality, valid

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, routing = self.layer(x, self.modality, valid=self.valid)
        return y, routing.aux_loss


def cuda_graph_layer(layer: nn.Module, x: Tensor, modality: Tensor, valid: Tensor) -> dict:
    """Capture the layer's forward and backward in a CUDA graph
    (``torch.cuda.make_graphed_callables``) and replay it: it only captures if no step syncs.
    ``captured`` None on a CPU."""
    if x.device.type != "cuda":
        return {"captured": None, "error": None}
    try:
        graphed = torch.cuda.make_graphed_callables(
            _LayerTensors(layer, modality, valid), (x.detach().requires_grad_(),)
        )
        y, aux = graphed(x.detach().requires_grad_())
        (y.float().square().mean() + aux).backward()
        torch.cuda.synchronize(x.device)
        return {"captured": True, "error": None}
    except RuntimeError as error:
        return {"captured": False, "error": str(error).strip().splitlines()[0]}


def run_ddp_check(
    processes: int, model: str, overrides: Sequence[str], steps: int, accelerator: str
) -> dict:
    """``limoe-train`` with ``trainer=ddp`` on ``processes`` devices for ``steps`` steps (NCCL
    on GPUs, gloo on CPU); its training pairs/s over all processes and final loss."""
    with tempfile.TemporaryDirectory(prefix="limoe-bench-ddp-") as out:
        cmd = [sys.executable, "-m", "limoe", "trainer=ddp",
               f"trainer.accelerator={accelerator}", f"trainer.devices={processes}",
               f"model={model}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
               "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
               f"hydra.run.dir={out}", f"paths.log_dir={out}", *overrides]  # fmt: skip
        if accelerator == "gpu":
            cmd.append("trainer.precision=bf16-mixed")
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the DDP check failed ({last}); command: {' '.join(cmd)}")
        metrics = read_metrics(Path(out) / "metrics.json").metrics
    loss = metrics.get("test/loss")
    return {"processes": processes, "model": model, "steps": steps,
            "pairs_per_s": metrics["train/samples_per_second"],
            "test_image_to_text_R@1": metrics.get("test/image_to_text_R@1"),
            "finite": loss is None or math.isfinite(loss)}  # fmt: skip
