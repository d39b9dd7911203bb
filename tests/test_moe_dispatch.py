"""The sorted dispatch (default) against GShard's one-hot einsum reference: same outputs and
same gradients for the same routing, whatever the choices, capacity and service order."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import bare_layer, outputs_and_grads, randomise

from limoe.moe import assign_slots, dispatch_tensors, onehot_moe

DIM, HIDDEN = 16, 24


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [1.0, 0.5, None])
@pytest.mark.parametrize("batch_priority", [True, False])
# (5, 8): empty experts; (64, 1) and (96, 32): one expert, and many
@pytest.mark.parametrize("num_tokens, num_experts", [(40, 4), (5, 8), (64, 1), (96, 32)])
def test_sorted_dispatch_equals_onehot_reference(
    top_k, capacity_factor, batch_priority, num_tokens, num_experts
):
    torch.manual_seed(num_tokens + top_k)
    top_k = min(top_k, num_experts)
    layer = bare_layer(DIM, HIDDEN, num_experts, top_k=top_k, capacity_factor=capacity_factor,
                     batch_priority=batch_priority, capacity_multiple=1)  # fmt: skip
    randomise(layer)
    x, probe = torch.randn(num_tokens, DIM), torch.randn(num_tokens, DIM)
    y, x_grad, grads, routing = outputs_and_grads(layer, x, "sorted", probe)
    y_ref, x_grad_ref, grads_ref, routing_ref = outputs_and_grads(layer, x, "onehot", probe)
    assert torch.equal(routing.expert_index, routing_ref.expert_index)
    assert torch.equal(routing.dropped, routing_ref.dropped)
    if capacity_factor == 0.5 and num_tokens > num_experts:
        assert routing.dropped.any()  # the capacity case does drop
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, x_grad_ref, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_dispatch_tensors_by_hand():
    # 3 tokens, top-1, 2 experts, capacity 2: tokens 0 and 2 -> expert 1 (slots 0, 1),
    # token 1 -> expert 0 (slot 0); token 2's choice is dropped.
    expert_index = torch.tensor([[1], [0], [1]])
    gates = torch.tensor([[0.9], [0.6], [0.7]])
    position, _ = assign_slots(expert_index, 2, capacity=2)
    dropped = torch.tensor([[False], [False], [True]])
    dispatch, combine = dispatch_tensors(expert_index, gates, position, dropped, 2, 2)
    assert dispatch.shape == (3, 2, 2)
    assert dispatch.nonzero().tolist() == [[0, 1, 0], [1, 0, 0]]
    assert combine[0, 1, 0] == pytest.approx(0.9) and combine[1, 0, 0] == pytest.approx(0.6)
    assert combine.sum() == pytest.approx(1.5)


def test_all_dropped_gives_zero_in_both_paths():
    layer = bare_layer(DIM, HIDDEN, 4, top_k=2)
    x = torch.randn(5, DIM)
    _, routing = layer(x)
    position, _ = assign_slots(routing.expert_index, 4, routing.capacity)
    dropped = torch.ones(5, 2, dtype=torch.bool)
    ref = onehot_moe(x, routing.expert_index, routing.gates, position, dropped, layer.experts,
                     routing.capacity)  # fmt: skip
    fast = layer.dispatch(x, routing.expert_index, routing.gates, dropped)
    assert (ref == 0).all() and (fast == 0).all()


def test_unknown_dispatch_mode_fails_with_one_line():
    with pytest.raises(ValueError, match=r"dispatch must be one of \('sorted', 'onehot'\)"):
        bare_layer(DIM, HIDDEN, 4, dispatch="dense")


@pytest.mark.parametrize("gemm", ["grouped", "padded"])
@pytest.mark.parametrize("capacity_factor", [1.0, None])
@pytest.mark.parametrize("num_tokens, num_experts", [(40, 4), (5, 8)])
def test_grouped_and_padded_gemms_equal_the_loop(
    gemm, capacity_factor, num_tokens, num_experts, device
):
    """``F.grouped_mm`` also runs on CPU in float32, so CI checks it and the padded batched
    GEMM against the per-expert loop: outputs and every gradient, with empty experts. With
    ``--device cuda`` the same comparison runs in bf16 on the GPU, where ``grouped`` is
    CUDA's grouped-GEMM kernel, to bf16's precision: 2% of each tensor's largest value (the
    bias gradients, sums over tokens rounded to bf16 in a different order, differ by about
    1.1% on an H200)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(num_tokens)
    layer = bare_layer(DIM, HIDDEN, num_experts, top_k=2, capacity_factor=capacity_factor,
                     capacity_multiple=1)  # fmt: skip
    randomise(layer).to(device, dtype)
    x = torch.randn(num_tokens, DIM, device=device, dtype=dtype)
    probe = torch.randn(num_tokens, DIM, device=device, dtype=dtype)
    results = {}
    for mode in ("loop", gemm):
        layer.experts.gemm = mode
        assert layer.experts.gemm_path(x, capacity_factor) == mode
        results[mode] = outputs_and_grads(layer, x, "sorted", probe)
    (y, x_grad, grads, _), (y_g, x_grad_g, grads_g, _) = results["loop"], results[gemm]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    pairs = {"y": (y_g, y), "x.grad": (x_grad_g, x_grad)}
    pairs.update({name: (grads_g[name], grad) for name, grad in grads.items()})
    for name, (got, want) in pairs.items():
        scale = want.float().abs().max().clamp_min(1e-6)
        error = (got.float() - want.float()).abs().max() / scale
        assert error <= tolerance, f"{name}: {float(error):.2e} of its largest value"


def test_auto_gemm_path():
    """On a CPU ``auto`` takes the loop (its reads of the row counts are in host memory), and
    the grouped GEMM when compiled in bf16 (no graph break); a forced mode is kept."""
    layer = bare_layer(DIM, HIDDEN, 4)
    x = torch.randn(40, DIM)
    assert layer.experts.gemm == "auto"
    assert layer.experts.gemm_path(x, None) == "loop" and layer.experts.gemm_path(x, 8) == "loop"
    layer.experts.gemm = "padded"
    assert layer.experts.gemm_path(x, 12) == "padded"
    with pytest.raises(ValueError, match=r"gemm must be one of \('auto', 'loop', 'grouped', "
                       r"'padded'\)"):  # fmt: skip
        bare_layer(DIM, HIDDEN, 4, gemm="cutlass")


@pytest.mark.parametrize("gemm", ["loop", "grouped", "padded"])
def test_sorted_dispatch_is_deterministic_on_cpu(gemm):
    torch.manual_seed(0)
    layer = bare_layer(DIM, HIDDEN, 8, top_k=2, capacity_factor=1.0, gemm=gemm)
    x, probe = torch.randn(300, DIM), torch.randn(300, DIM)
    first = outputs_and_grads(layer, x, "sorted", probe)
    second = outputs_and_grads(layer, x, "sorted", probe)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(g, second[2][n]) for n, g in first[2].items())
