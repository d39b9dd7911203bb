"""MoELayer end to end: naive per-token reference, BPR drops, edge cases, dtypes, errors."""

import math

import pytest
import torch
from moe_helpers import bare_layer, expert_mlp, make_layer, randomise
from timm.layers import Mlp

from limoe.moe import Routing

DIM, HIDDEN = 8, 16


def naive_forward(layer, x):
    """Independent reference: per-token loops for routing, slot filling and combining."""
    n, e_num, k = x.shape[0], layer.num_experts, layer.top_k
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)
    gates, idx = probs.topk(k, dim=-1)
    if layer.router.renormalize_gates:
        gates = gates / gates.sum(-1, keepdim=True)
    if layer.capacity_factor is None:
        capacity = math.inf
    else:
        capacity = math.ceil(k * layer.capacity_factor * n / e_num)
        capacity = -(-capacity // layer.router.capacity_multiple) * layer.router.capacity_multiple
    top1 = probs.max(-1).values.tolist()
    order = sorted(range(n), key=lambda i: -top1[i]) if layer.router.batch_priority else range(n)
    filled = [0] * e_num
    kept = torch.zeros(n, k, dtype=torch.bool)
    for j in range(k):
        for i in order:
            e = int(idx[i, j])
            kept[i, j] = filled[e] < capacity
            filled[e] += 1
    outs = [expert_mlp(layer, e, x) for e in range(e_num)]  # every expert on every token
    y = torch.zeros_like(x)
    for i in range(n):
        for j in range(k):
            if kept[i, j]:
                y[i] += gates[i, j] * outs[int(idx[i, j])][i]
    return y, ~kept


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
def test_matches_naive_reference(top_k, capacity_factor, batch_priority, renormalize):
    torch.manual_seed(top_k)
    layer = bare_layer(
        DIM,
        HIDDEN,
        4,
        top_k=top_k,
        capacity_factor=capacity_factor,
        batch_priority=batch_priority,
        renormalize_gates=renormalize,
        capacity_multiple=1,
    )
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)  # decisive routing: distinct priorities
    x = torch.randn(24, DIM)
    y, routing = layer(x)
    with torch.no_grad():
        y_ref, dropped_ref = naive_forward(layer, x)
    assert torch.equal(routing.dropped, dropped_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    if capacity_factor == 0.5:
        assert routing.dropped.any()
    if capacity_factor is None:
        assert not routing.dropped.any()


def hand_router_layer(**kwargs):
    """E=2, logit_0 = x[:, 0], logit_1 = 0: a token with x0 > 0 picks expert 0 with gate sigmoid(x0)."""
    layer = bare_layer(DIM, HIDDEN, 2, **kwargs)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0
    return layer


def bpr_tokens():
    x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.1, 2.5, 1.5, 0.8])
    return x


def test_drop_order_without_bpr():
    layer = hand_router_layer(batch_priority=False)  # C = ceil(8 / 2) = 4
    y, routing = layer(bpr_tokens())
    assert routing.capacity == 4
    assert (routing.expert_index[:, 0] == 0).all()
    assert routing.dropped[:, 0].tolist() == [False] * 4 + [True] * 4
    assert (y[4:] == 0).all() and (y[:4] != 0).any(-1).all()


def test_drop_order_with_bpr():
    layer = hand_router_layer(batch_priority=True)
    x = bpr_tokens()
    y, routing = layer(x)
    torch.testing.assert_close(routing.gates[:, 0], torch.sigmoid(x[:, 0]))
    # The 4 largest gates (x0 = 3.0, 2.5, 2.0, 1.5: tokens 3, 5, 1, 6) keep their slots.
    assert routing.dropped[:, 0].tolist() == [True, False, True, False, True, False, False, True]
    assert (y[routing.dropped[:, 0]] == 0).all()


def test_top2_choices_served_after_all_top1():
    # Tokens 0-3 pick expert 0 then 1 and have the highest priorities; tokens 4-7 pick
    # expert 1 then 0. C = ceil(2 * 0.5 * 8 / 2) = 4: the top-1 choices fill both experts,
    # so every top-2 choice is dropped, even token 0's, whose gate beats tokens 4-7.
    layer = hand_router_layer(top_k=2, capacity_factor=0.5, batch_priority=True)
    x = bpr_tokens()
    x[:, 0] = torch.tensor([3.0, 2.5, 2.0, 1.5, -1.0, -1.2, -0.5, -0.1])
    _, routing = layer(x)
    assert routing.capacity == 4
    assert routing.expert_index[:, 0].tolist() == [0] * 4 + [1] * 4
    assert not routing.dropped[:, 0].any()
    assert routing.dropped[:, 1].all()


def test_dropless_never_drops_when_all_pick_one_expert():
    layer = hand_router_layer(top_k=2, capacity_factor=None)
    x = bpr_tokens()
    y, routing = layer(x)
    assert routing.capacity is None
    assert not routing.dropped.any()
    with torch.no_grad():
        y_ref, _ = naive_forward(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_tiny_capacity_keeps_one_token_per_expert():
    layer = hand_router_layer(capacity_factor=0.01, capacity_multiple=1)  # ceil(0.04) = 1
    y, routing = layer(bpr_tokens())
    assert routing.capacity == 1
    assert routing.dropped[:, 0].tolist() == [i != 3 for i in range(8)]  # token 3 has top gate
    assert (y[torch.arange(8) != 3] == 0).all()


def test_every_choice_dropped_gives_zero_output():
    layer = bare_layer(DIM, HIDDEN, 4, top_k=2)
    x = torch.randn(5, DIM)
    _, routing = layer(x)
    y = layer.dispatch(x, routing.expert_index, routing.gates, torch.ones(5, 2, dtype=torch.bool))
    assert y.shape == (5, DIM) and (y == 0).all()


def test_expert_without_tokens_and_gradients():
    # Experts 2 and 3 receive no token: logits favour experts 0/1 by a wide margin.
    layer = bare_layer(DIM, HIDDEN, 4, top_k=2, capacity_factor=None)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = layer.router.weight[1, 1] = 5.0
    x = torch.randn(12, DIM).abs() + 0.1
    y, routing = layer(x)
    assert set(routing.expert_index.flatten().tolist()) == {0, 1}
    with torch.no_grad():
        torch.testing.assert_close(y, naive_forward(layer, x)[0], rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    ex = layer.experts
    assert layer.router.weight.grad.abs().sum() > 0
    for p in (ex.w1, ex.b1, ex.w2, ex.b2):
        assert (p.grad[:2].abs().flatten(1).sum(-1) > 0).all()
        assert (p.grad[2:] == 0).all()


def test_gradients_reach_router_and_used_experts():
    layer = bare_layer(DIM, HIDDEN, 3, top_k=1, capacity_factor=None)
    x = torch.randn(30, DIM, requires_grad=True)
    y, routing = layer(x)
    y.sum().backward()
    used = routing.expert_index.unique().tolist()
    assert layer.router.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    for e in used:
        assert layer.experts.w1.grad[e].abs().sum() > 0
        assert layer.experts.w2.grad[e].abs().sum() > 0


def test_single_expert_equals_dense_timm_mlp():
    layer = bare_layer(DIM, HIDDEN, 1, capacity_factor=1.0)
    mlp = Mlp(DIM, HIDDEN)
    with torch.no_grad():
        mlp.fc1.weight.copy_(layer.experts.w1[0].T)
        mlp.fc1.bias.copy_(layer.experts.b1[0])
        mlp.fc2.weight.copy_(layer.experts.w2[0].T)
        mlp.fc2.bias.copy_(layer.experts.b2[0])
    x = torch.randn(13, DIM)
    y, routing = layer(x)
    assert not routing.dropped.any()
    assert (routing.gates == 1).all()
    torch.testing.assert_close(y, mlp(x), rtol=1e-5, atol=1e-6)


def test_empty_batch():
    layer = bare_layer(DIM, HIDDEN, 4, top_k=2, load_weight=1.0, importance_weight=1.0)
    x = torch.zeros(0, DIM, requires_grad=True)
    y, routing = layer(x, torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, DIM)
    assert routing.capacity == 0
    assert routing.expert_index.shape == routing.dropped.shape == (0, 2)
    assert routing.probs.shape == (0, 4)
    assert all(v.item() == 0.0 for v in routing.aux_losses.values())
    (y.sum() + routing.aux_loss).backward()


def test_routing_record_types():
    layer = bare_layer(DIM, HIDDEN, 4, top_k=2)
    modality = torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32)
    _, routing = layer(torch.randn(5, DIM), modality)
    assert isinstance(routing, Routing)
    assert routing.expert_index.dtype == torch.long and routing.expert_index.shape == (5, 2)
    assert routing.gates.dtype == torch.float32 and routing.gates.shape == (5, 2)
    assert routing.dropped.dtype == torch.bool
    assert routing.probs.dtype == torch.float32 and routing.probs.shape == (5, 4)
    assert routing.modality.dtype == torch.long
    assert routing.capacity == 4  # ceil(2 * 5 / 4) = 3 -> 4


def test_bf16_autocast_and_dtypes():
    torch.manual_seed(0)
    layer = bare_layer(DIM, HIDDEN, 4, capacity_factor=None)
    x = torch.randn(16, DIM)
    y32, r32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, r16 = layer(x)
    assert r16.probs.dtype == torch.float32
    assert torch.equal(r16.expert_index, r32.expert_index)  # router runs in float32
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.02)
    y, _ = layer(x.bfloat16())  # bf16 input, float32 weights, no autocast
    assert y.dtype == torch.bfloat16
    y, _ = layer.to(torch.bfloat16)(x)  # bf16 weights, float32 input
    assert y.dtype == torch.float32


def test_noisy_gating_only_in_training():
    torch.manual_seed(0)
    num_experts = 4
    layer = bare_layer(DIM, HIDDEN, num_experts, noisy_gating=True)
    x = torch.randn(4000, DIM)
    clean = torch.softmax(layer.router.logits(x), -1)
    layer.eval()
    torch.testing.assert_close(layer(x)[1].probs, clean)
    layer.train()
    noisy = layer(x)[1].probs
    # log p_0 - log p_1 moves by noise_0 - noise_1, whose std is sqrt(2) / E.
    diff = (noisy.log() - clean.log())[:, 0] - (noisy.log() - clean.log())[:, 1]
    assert diff.std().item() == pytest.approx(math.sqrt(2) / num_experts, rel=0.05)
    assert diff.mean().abs().item() < 0.02


def test_dropout_active_only_in_training():
    layer = bare_layer(DIM, HIDDEN, 2, capacity_factor=None, drop=0.5)
    x = torch.randn(10, DIM)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
    layer.train()
    assert not torch.equal(layer(x)[0], layer(x)[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_experts": 0}, "num_experts must be an integer >= 1, got 0"),
        ({"top_k": 0}, r"top_k must be in \[1, num_experts=4\], got 0"),
        ({"top_k": 5}, r"top_k must be in \[1, num_experts=4\], got 5"),
        ({"capacity_factor": 0.0}, "capacity_factor must be a number > 0 or null"),
        ({"capacity_factor": -1.0}, "capacity_factor must be a number > 0 or null"),
        ({"capacity_multiple": 0}, "capacity_multiple must be >= 1, got 0"),
        ({"global_entropy_min_experts": (1.0, 2.0, 3.0)}, "or one per modality"),
        ({"global_entropy_min_experts": 0.0}, "global_entropy_min_experts must be a number > 0"),
        ({"top_k": "x"}, "top_k must be an integer, got 'x'"),
        ({"capacity_factor": "big"}, "capacity_factor must be a number > 0 or null"),
    ],
)
def test_config_errors(kwargs, match):
    args = {"dim": DIM, "hidden": HIDDEN, "num_experts": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        bare_layer(**args)


@pytest.mark.parametrize(
    ("x_shape", "modality", "match"),
    [
        ((2, 4, DIM), None, r"x must have shape \[N, dim=8\], got \(2, 4, 8\)"),
        ((8, DIM + 1), None, r"x must have shape \[N, dim=8\], got \(8, 9\)"),
        ((8, DIM), torch.zeros(7, dtype=torch.long), "modality has 7 entries but x has 8 tokens"),
        ((8, DIM), torch.zeros(2, 4, dtype=torch.long), r"modality must be 1-D \[N\], got shape"),
        ((8, DIM), torch.zeros(8), "modality must hold integer ids"),
    ],
)
def test_input_errors(x_shape, modality, match):
    layer = bare_layer(DIM, HIDDEN, 4)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(*x_shape), modality)


@pytest.mark.parametrize("bad_id", [2, -1])
def test_modality_ids_out_of_range_are_caught_on_the_device(bad_id):
    """The range is checked by ``torch._assert_async`` (no host read): on a CPU it raises at
    once with the message; on a GPU it is a device-side assert."""
    layer = bare_layer(DIM, HIDDEN, 4)
    modality = torch.zeros(8, dtype=torch.long)
    modality[3] = bad_id
    with pytest.raises(RuntimeError, match=r"modality ids must be in \[0, 2\)"):
        layer(torch.randn(8, DIM), modality)


@pytest.mark.parametrize("dispatch", ["sorted", "onehot"])
def test_modality_router_sends_each_token_to_its_modality_expert(dispatch):
    """router='modality' (the multiway MLP): token of modality m -> expert m, gate 1, no
    drops, no auxiliary loss; the output is that expert's MLP by hand."""
    torch.manual_seed(0)
    layer = randomise(
        make_layer(DIM, HIDDEN, 2, router="modality", capacity_factor=None, dispatch=dispatch)
    )
    x = torch.randn(11, DIM)
    modality = torch.tensor([0, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0])
    y, routing = layer(x, modality)
    expected = torch.where(modality[:, None] == 0, expert_mlp(layer, 0, x), expert_mlp(layer, 1, x))
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.equal(routing.expert_index[:, 0], modality)
    assert torch.equal(routing.gates, torch.ones(11, 1))
    assert not routing.dropped.any() and routing.aux_losses == {}
    assert float(routing.aux_loss) == 0.0
    assert sum(p.numel() for p in layer.parameters()) == sum(
        p.numel() for p in layer.experts.parameters()
    )  # no router weights


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 4}, "num_experts must be 2"),
        ({"num_experts": 2, "capacity_factor": 1.0}, "capacity_factor must be None"),
    ],
)
def test_modality_router_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_layer(DIM, HIDDEN, **{"capacity_factor": None, **kwargs}, router="modality")


def test_modality_router_needs_modality():
    layer = make_layer(DIM, HIDDEN, 2, router="modality", capacity_factor=None)
    with pytest.raises(ValueError, match="needs each token's modality"):
        layer(torch.randn(3, DIM))


def test_eval_capacity_factor_applies_in_eval_mode_only():
    """V-MoE's eval capacity: training keeps capacity_factor, eval() takes
    eval_capacity_factor (None: the training one; 'dropless': no capacity)."""
    x = torch.randn(64, DIM)
    for eval_factor, expected in ((None, 16), (2.0, 32), ("dropless", None)):
        torch.manual_seed(0)
        layer = bare_layer(DIM, HIDDEN, 4, capacity_factor=1.0, eval_capacity_factor=eval_factor)
        assert layer.train()(x)[1].capacity == 16  # ceil(64 / 4), a multiple of 4
        routing = layer.eval()(x)[1]
        assert routing.capacity == expected
        assert not routing.dropped.any() if expected is None else True
    with pytest.raises(ValueError, match="eval_capacity_factor must be"):
        bare_layer(DIM, HIDDEN, 4, eval_capacity_factor=0)
    with pytest.raises(ValueError, match="not with router=expert_choice"):
        bare_layer(DIM, HIDDEN, 4, router="expert_choice", eval_capacity_factor="dropless")
