"""The MoE layer's GPU properties, proved on a CPU: no host synchronisation in a training step
(``sync_counter``), no graph break under ``torch.compile(fullgraph=True)``, a number of
operators that does not grow with the experts, and bitwise-equal runs."""

from __future__ import annotations

from contextlib import ExitStack

import lightning as L
import pytest
import torch
from moe_helpers import bare_layer, make_layer, randomise
from sync_counter import count_syncs
from torch.profiler import ProfilerActivity, profile

from limoe.models.limoe import Block, attention_bias, token_origin
from limoe.moe import MoELayer, update_expert_bias
from limoe.train import build_datamodule, build_module, build_trainer, compose

DIM, HIDDEN = 32, 64


def layer_step(layer: MoELayer, x: torch.Tensor, modality, valid=None) -> None:
    y, routing = layer(x, modality, valid=valid)
    ((y.float() * y.float()).mean() + routing.aux_loss).backward()


def modality_and_padding(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens first, then text whose last quarter is padding."""
    modality = (torch.arange(num_tokens) >= num_tokens // 2).long()
    valid = torch.arange(num_tokens) < num_tokens - num_tokens // 8
    return modality, valid


# The paths a GPU takes: the grouped GEMM (Hopper and later, bf16), and the padded buffer at a
# capacity elsewhere. (On a CPU ``auto`` takes the loop, whose host-side slices wait for nothing
# there; on a GPU it is the fallback for dropless layers without a grouped GEMM.)
GPU_PATHS = [("grouped", None), ("grouped", 1.0), ("padded", 1.0)]


@pytest.mark.parametrize("num_experts", [1, 8, 32])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(("gemm", "capacity_factor"), GPU_PATHS)
def test_layer_forward_and_backward_never_wait_on_the_device(
    num_experts, top_k, gemm, capacity_factor
):
    """LIMoE's losses on, gating noise, BPR at a capacity, text padding routed: not one
    operation that would synchronise a GPU (the layer before this design made 11)."""
    torch.manual_seed(0)
    top_k = min(top_k, num_experts)
    layer = make_layer(DIM, HIDDEN, num_experts, top_k=top_k, capacity_factor=capacity_factor,
                     gemm=gemm,
                     global_entropy_min_experts=min(2.0, num_experts) if num_experts > 1 else 2.0,
                     global_entropy_weight=0.01 if num_experts > 1 else 0.0,
                     load_weight=0.01, z_loss_weight=0.01)  # fmt: skip
    x = torch.randn(96, DIM, requires_grad=True)
    modality, valid = modality_and_padding(96)
    with count_syncs() as syncs:
        layer_step(layer, x, modality, valid)
    assert len(syncs) == 0, syncs.summary()


@pytest.mark.parametrize(("gemm", "capacity_factor"), GPU_PATHS)
def test_bias_balancing_and_sigmoid_scores_never_wait_on_the_device(gemm, capacity_factor):
    """Counting each modality's tokens in the forward and the bias update after the step
    (one-hot sums, a sign, no host read) add no synchronisation."""
    torch.manual_seed(0)
    layer = make_layer(DIM, HIDDEN, 8, top_k=2, capacity_factor=capacity_factor, gemm=gemm,
                       balance="bias", bias_per_modality=True, score="sigmoid")  # fmt: skip
    x = torch.randn(96, DIM, requires_grad=True)
    modality, valid = modality_and_padding(96)
    with count_syncs() as syncs:
        layer_step(layer, x, modality, valid)
        update_expert_bias(layer)
    assert len(syncs) == 0, syncs.summary()
    assert layer.router.expert_bias.abs().sum() > 0


def test_the_counter_catches_what_the_old_layer_did():
    """The counter is not blind: the loop path reads the row counts on the host, and the
    boolean mask and ``nonzero`` of the old dispatch are caught too."""
    layer = make_layer(DIM, HIDDEN, 4, gemm="loop")
    x = torch.randn(20, DIM)
    with count_syncs() as syncs:
        layer(x)
        x[x[:, 0] > 0]
        torch.nonzero(x)
        bool(x.sum() > 0)
    kinds = [what for what, _ in syncs.events]
    assert kinds == ["Tensor.tolist", "aten.index.Tensor with a boolean index",
                     "aten.nonzero.default", "aten._local_scalar_dense.default"]  # fmt: skip
    assert syncs.events[0][1].startswith("moe/experts.py:")


class StepSyncs(L.Callback):
    """The synchronisations of each training batch, from its start to its end (forward, losses,
    backward, finite checks, clipping, AdamW, callbacks)."""

    def __init__(self) -> None:
        self.per_step: dict[int, object] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stack = ExitStack()
        self._syncs = self._stack.enter_context(count_syncs())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stack.close()
        self.per_step[batch_idx] = self._syncs


# What a GPU runs: the grouped GEMM (on a CPU ``auto`` takes the loop, which reads the row
# counts in host memory).
GROUPED = ["model.moe.experts.gemm=grouped"]
TINY_B32 = ["model=limoe_b32", "model.width=32", "model.num_heads=2", "model.depth=4",
            "model.moe_layers=[1,3]", "model.embed_dim=16", "data.image_size=64",
            "data.context_length=16"]  # fmt: skip


BIAS = ["model.moe.router.balance=bias", "model.moe.router.bias_per_modality=true"]


@pytest.mark.parametrize("model", [GROUPED, TINY_B32 + GROUPED, GROUPED + BIAS],
                         ids=["default", "limoe_b32-shaped", "bias-balanced"])  # fmt: skip
def test_a_training_step_never_waits_on_the_device(model, tmp_path):
    """Whole Lightning training steps of the default LIMoE (dropless) and of a small model
    shaped like LIMoE-B/32 (capacity 1.0, BPR, experts in every other block), with the run's
    callbacks and clipping: no synchronisation on the steps the logger does not write, and on
    the logging steps only the transfers of the logged values (stats, gradient norms)."""
    cfg = compose(["trainer=cpu", "trainer.max_steps=5", "trainer.log_every_n_steps=3",
                   "data.batch_size=16", "data.num_workers=0", "test=false",
                   "+trainer.limit_val_batches=0", "callbacks.progress_bar=null",
                   "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}", *model],
                  output_dir=tmp_path)  # fmt: skip
    L.seed_everything(0)
    datamodule = build_datamodule(cfg)
    module, watch = build_module(cfg, datamodule), StepSyncs()
    trainer = build_trainer(cfg, callbacks=[watch])
    trainer.fit(module, datamodule=datamodule)
    assert set(watch.per_step) == {0, 1, 2, 3, 4}  # 2 and the last, 4, log
    for step in (0, 1, 3):
        assert len(watch.per_step[step]) == 0, f"step {step}:\n{watch.per_step[step].summary()}"
    reads = sorted(where.split(":")[0] for _, where in watch.per_step[2].events)
    assert reads == ["lit/callbacks.py", "lit/module.py", "lit/module.py"]  # stats, norms, norm


@pytest.mark.parametrize(
    ("capacity_factor", "router"),
    [(None, {}), (1.0, {}), (None, {"balance": "bias", "score": "sigmoid"})],
    ids=["dropless", "capacity", "bias-sigmoid"],
)
def test_the_layer_compiles_without_a_graph_break_in_bf16(capacity_factor, router):
    """``torch.compile(fullgraph=True)`` of the layer in bf16, forward and backward, equals
    eager (inductor's random numbers are eager's with ``fallback_random``); a bias-balanced
    router's token counts (a buffer written in the forward) too."""
    torch.manual_seed(0)
    layer = randomise(make_layer(DIM, HIDDEN, 8, top_k=2, capacity_factor=capacity_factor,
                                 **router))  # fmt: skip
    layer = layer.to(torch.bfloat16)
    x = torch.randn(64, DIM, dtype=torch.bfloat16)
    modality, valid = modality_and_padding(64)
    probe = torch.randn(64, DIM, dtype=torch.bfloat16)

    def step(module):
        module.zero_grad()
        torch.manual_seed(1)
        inputs = x.clone().requires_grad_(True)
        y, routing = module(inputs, modality, valid=valid)
        ((y * probe).float().sum() + routing.aux_loss).backward()
        return [y, inputs.grad, *(p.grad for p in layer.parameters())]

    eager = step(layer)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = step(torch.compile(layer, fullgraph=True))
    for got, want in zip(compiled, eager):
        assert_close_in_bf16(got, want)
    if router:  # both steps counted their real tokens' 2 choices (224: exact in bf16)
        assert layer.router.expert_tokens.sum().item() == 2 * 2 * valid.sum().item()


def assert_close_in_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to bf16's precision: within 2% of the tensor's largest value (inductor fuses and
    rounds in another order than eager)."""
    scale = want.float().abs().max().clamp_min(1e-6)
    assert (got.float() - want.float()).abs().max() / scale <= 2e-2


def test_a_block_compiles_without_a_graph_break_in_bf16():
    torch.manual_seed(0)
    block = Block(DIM, 2, moe={"num_experts": 4}).to(torch.bfloat16).eval()
    image = torch.randn(2, 9, DIM, dtype=torch.bfloat16)
    text = torch.randn(2, 6, DIM, dtype=torch.bfloat16)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    origin, bias = token_origin(image, mask), attention_bias(mask, torch.bfloat16, causal=True)
    eager = block(image, text, bias, origin)
    compiled = torch.compile(block, fullgraph=True)(image, text, bias, origin)
    for got, want in zip(compiled[:2], eager[:2]):
        assert_close_in_bf16(got, want)
    image.requires_grad_(True)
    out = torch.compile(block, fullgraph=True)(image, text, bias, origin)
    out[0].float().sum().backward()
    assert torch.isfinite(image.grad).all()


def operator_count(num_experts: int) -> int:
    torch.manual_seed(0)
    layer = make_layer(DIM, HIDDEN, num_experts, capacity_factor=1.0, gemm="grouped")
    x = torch.randn(256, DIM, requires_grad=True)
    modality, valid = modality_and_padding(256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer_step(layer, x, modality, valid)
    return sum(1 for event in prof.events() if event.name.startswith("aten::")
               and not _inside_an_operator(event))  # fmt: skip


def _inside_an_operator(event) -> bool:
    """Called by another aten operator (its own kernels: on a CPU, ``_grouped_mm`` loops over
    the groups; a GPU runs one kernel)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


# The layer's forward and backward, losses included, at any number of experts (counted: 423
# aten calls at E = 8 and 32, most of them views and the losses' small reductions).
OPERATOR_BUDGET = 500


def test_the_number_of_operators_does_not_grow_with_the_experts():
    """No per-expert launches on the grouped path: E = 8 and E = 32 run the same operators."""
    at_8, at_32 = operator_count(8), operator_count(32)
    assert at_8 == at_32
    assert at_8 <= OPERATOR_BUDGET


@pytest.mark.parametrize("gemm", ["grouped", "padded", "loop"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_two_runs_give_bitwise_equal_weights_under_deterministic_algorithms(gemm, capacity_factor):
    """Five AdamW steps twice from one seed, with ``torch.use_deterministic_algorithms``:
    every weight equal to the bit (no scatter-add whose order varies)."""

    def train() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        layer = make_layer(DIM, HIDDEN, 8, top_k=2, capacity_factor=capacity_factor, gemm=gemm)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        modality, valid = modality_and_padding(128)
        for _ in range(5):
            optimizer.zero_grad()
            layer_step(layer, torch.randn(128, DIM), modality, valid)
            optimizer.step()
        return {n: p.detach().clone() for n, p in layer.named_parameters()}

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = train(), train()
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.parametrize("gemm", ["grouped", "loop"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_padding_is_left_out_of_everything(gemm, capacity_factor):
    """Routing padded tokens beside the real ones changes nothing for the real ones: outputs,
    gradients, losses and capacity equal those of the real tokens alone (the capacity is
    the real tokens', read on the device)."""
    torch.manual_seed(0)
    layer = randomise(bare_layer(DIM, HIDDEN, 4, top_k=2, capacity_factor=capacity_factor,
                                 local_entropy_weight=0.01, global_entropy_weight=0.01,
                                 global_entropy_min_experts=2.0, importance_weight=0.01,
                                 gemm=gemm))  # fmt: skip
    real, pad = torch.randn(40, DIM), torch.randn(12, DIM) * 5
    probe = torch.randn(52, DIM)
    modality = torch.cat([torch.zeros(20), torch.ones(32)]).long()
    valid = torch.arange(52) < 40
    x = torch.cat([real, pad])
    layer.zero_grad()
    x_all = x.clone().requires_grad_(True)
    y, routing = layer(x_all, modality, valid=valid)
    ((y * probe).sum() + routing.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    real_in = real.clone().requires_grad_(True)
    y_ref, ref = layer(real_in, modality[:40])
    ((y_ref * probe[:40]).sum() + ref.aux_loss).backward()
    torch.testing.assert_close(y[:40], y_ref, rtol=1e-5, atol=1e-6)
    assert (y[40:] == 0).all() and (x_all.grad[40:] == 0).all()
    torch.testing.assert_close(x_all.grad[:40], real_in.grad, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(layer.named_parameters())[name].grad,
                                   rtol=1e-5, atol=1e-6, msg=name)  # fmt: skip
    for key, value in ref.aux_losses.items():
        torch.testing.assert_close(routing.aux_losses[key], value, rtol=1e-5, atol=1e-6)
    assert torch.equal(routing.real().dropped, ref.dropped)
    assert routing.real().capacity == ref.capacity
