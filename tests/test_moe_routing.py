"""Routing pipeline pieces: capacity, route, slot assignment (BPR, rank order), dispatch."""

from fractions import Fraction

import pytest
import torch

from limoe.moe import (
    assign_slots,
    combine,
    compute_capacity,
    gather_tokens,
    route,
    sort_by_expert,
)
from limoe.moe.routing import top_choices


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "cf", "multiple_of", "expected"),
    [
        (8, 4, 1, 1.0, 1, 2),  # 8 / 4 = 2
        (8, 4, 1, 1.0, 4, 4),  # 2 rounded up to a multiple of 4
        (10, 4, 2, 1.25, 1, 7),  # 2 * 1.25 * 10 / 4 = 6.25 -> 7
        (10, 4, 2, 1.25, 4, 8),  # 7 -> 8
        (100, 8, 1, 1.0, 4, 16),  # 12.5 -> 13 -> 16
        (64, 8, 2, 1.0, 4, 16),  # 16 exactly, already a multiple of 4
        (3, 8, 1, 1.0, 1, 1),  # 0.375 -> 1: a non-empty batch always gets a slot
        (10, 1, 1, 1.1, 1, 11),  # 1.1 * 10 = 11.000000000000002 in floats -> still 11
        (8, 2, 1, 0.01, 1, 1),  # tiny factor -> 1 slot per expert
        (0, 4, 1, 1.0, 4, 0),  # no tokens -> no slots
    ],
)
def test_compute_capacity(num_tokens, num_experts, top_k, cf, multiple_of, expected):
    assert compute_capacity(num_tokens, num_experts, top_k, cf, multiple_of) == expected


def test_compute_capacity_dropless_is_none():
    assert compute_capacity(8, 4, 1, None) is None
    assert compute_capacity(0, 4, 1, None) is None


def test_route_hand_values():
    probs_in = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    logits = probs_in.log() + torch.tensor([[3.0], [-1.0]])  # shift: softmax unchanged
    probs, gates, idx = route(logits, top_k=2)
    torch.testing.assert_close(probs, probs_in)
    torch.testing.assert_close(gates, torch.tensor([[0.5, 0.3], [0.7, 0.2]]))
    assert idx.tolist() == [[0, 1], [2, 1]]
    _, gates_renorm, _ = route(logits, top_k=2, renormalize=True)
    torch.testing.assert_close(gates_renorm, torch.tensor([[0.625, 0.375], [0.7 / 0.9, 0.2 / 0.9]]))


def test_renormalised_top1_gate_is_one_and_passes_the_plain_gates_gradient_over_p():
    # Token probabilities [0.5, 0.3, 0.2] and [0.1, 0.2, 0.7]: each gate's value is 1, and
    # d gate / d logits is that of p / p_chosen (held fixed): (onehot - p) for softmax.
    probs_in = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    logits = probs_in.log().requires_grad_()
    _, gates, idx = route(logits, top_k=1, renormalize=True)
    assert gates.tolist() == [[1.0], [1.0]] and idx.tolist() == [[0], [2]]
    gates.sum().backward()
    want = torch.tensor([[1 - 0.5, -0.3, -0.2], [-0.1, -0.2, 1 - 0.7]])
    torch.testing.assert_close(logits.grad, want)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_choices_equal_torch_topk(k):
    torch.manual_seed(0)
    scores = torch.randn(300, 8)
    values, index = top_choices(scores, k)
    want = torch.topk(scores, k, dim=-1)
    assert torch.equal(values, want.values) and torch.equal(index, want.indices)


def test_route_is_float32_from_bf16_logits():
    probs, gates, _ = route(torch.randn(5, 4, dtype=torch.bfloat16), top_k=1)
    assert probs.dtype == gates.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def test_assign_slots_token_order():
    # Expert 0 gets tokens 0, 1, 3 in that order; capacity 2 drops token 3.
    idx = torch.tensor([[0], [0], [1], [0], [1]])
    position, dropped = assign_slots(idx, num_experts=2, capacity=2)
    assert position[:, 0].tolist() == [0, 1, 0, 2, 1]
    assert dropped[:, 0].tolist() == [False, False, False, True, False]


def test_assign_slots_batch_priority():
    idx = torch.tensor([[0], [0], [1], [0], [1]])
    priority = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.2])
    # Service order 1, 3, 2, 4, 0: expert 0 serves 1, 3, then 0 (dropped at capacity 2).
    position, dropped = assign_slots(idx, num_experts=2, capacity=2, priority=priority)
    assert position[:, 0].tolist() == [2, 0, 0, 1, 1]
    assert dropped[:, 0].tolist() == [True, False, False, False, False]


def test_assign_slots_priority_ties_broken_by_index():
    idx = torch.zeros(4, 1, dtype=torch.long)
    priority = torch.tensor([0.5, 0.9, 0.5, 0.5])
    position, _ = assign_slots(idx, num_experts=1, capacity=4, priority=priority)
    assert position[:, 0].tolist() == [1, 0, 2, 3]


def test_assign_slots_serves_all_top1_before_any_top2():
    # Token-major service would drop token 2's top-1 choice; rank-major keeps every top-1.
    idx = torch.tensor([[1, 0], [0, 1], [0, 1]])
    position, dropped = assign_slots(idx, num_experts=2, capacity=2)
    assert position.tolist() == [[0, 2], [0, 1], [1, 2]]
    assert dropped.tolist() == [[False, True], [False, False], [False, True]]


def test_assign_slots_dropless_and_zero_capacity():
    idx = torch.zeros(6, 2, dtype=torch.long)
    idx[:, 1] = 1
    position, dropped = assign_slots(idx, num_experts=3, capacity=None)
    assert not dropped.any()
    assert position.tolist() == [[i, i] for i in range(6)]
    _, dropped = assign_slots(idx, num_experts=3, capacity=0)
    assert dropped.all()


def test_assign_slots_empty():
    position, dropped = assign_slots(torch.zeros(0, 2, dtype=torch.long), 4, capacity=0)
    assert position.shape == dropped.shape == (0, 2)


def reference_slots(idx, capacity, priority):
    """Plain loop: rank by rank, tokens by descending priority (ties by index), count per expert."""
    n, k = len(idx), len(idx[0])
    order = sorted(range(n), key=lambda i: (-priority[i], i)) if priority else range(n)
    filled, position = {}, [[None] * k for _ in range(n)]
    for j in range(k):
        for i in order:
            e = idx[i][j]
            position[i][j] = filled.get(e, 0)
            filled[e] = position[i][j] + 1
    dropped = [[p >= capacity for p in row] for row in position]
    return position, dropped


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("use_priority", [False, True])
def test_assign_slots_matches_loop_reference(top_k, use_priority):
    gen = torch.Generator().manual_seed(top_k)
    num_tokens, num_experts, capacity = 37, 5, 6
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    probs, _, idx = route(logits, top_k)
    # Rounded priorities create ties, which must be broken by token index.
    priority = (probs.amax(-1) * 4).round() / 4 if use_priority else None
    position, dropped = assign_slots(idx, num_experts, capacity, priority)
    ref_pos, ref_dropped = reference_slots(
        idx.tolist(), capacity, priority.tolist() if use_priority else None
    )
    assert position.tolist() == ref_pos
    assert dropped.tolist() == ref_dropped
    assert dropped.any()  # the test exercises drops


def test_sort_by_expert_hand_example():
    idx = torch.tensor([[1, 2], [0, 1], [1, 0]])  # flat choices 0..5 -> experts 1,2,0,1,1,0
    dropped = torch.tensor([[False, True], [False, False], [False, False]])
    s = sort_by_expert(idx, dropped, num_experts=4)
    # expert 0: choices 2, 5; expert 1: choices 0, 3, 4; expert 2's choice 1 is dropped: last.
    assert s.order.tolist() == [2, 5, 0, 3, 4, 1]
    assert s.expert.tolist() == [0, 0, 1, 1, 1, 4]
    assert s.offsets.tolist() == [2, 5, 5, 5] and s.counts().tolist() == [2, 3, 0, 0]
    assert s.row.tolist() == [2, 5, 0, 3, 4, 1]  # the inverse permutation (here its own)
    assert s.row_kept.tolist() == [True] * 5 + [False]
    x = torch.arange(3.0).unsqueeze(-1)
    assert gather_tokens(x, s, top_k=2)[:, 0].tolist() == [1.0, 2.0, 0.0, 1.0, 2.0, 0.0]


def test_combine_hand_example():
    # choices (k = 2) of tokens 0..3; choice 1 (token 0's second) and 7 (token 3's) dropped
    idx = torch.tensor([[1, 0], [0, 1], [1, 0], [2, 2]])
    dropped = torch.tensor([[False, True], [False, True], [False, False], [True, True]])
    s = sort_by_expert(idx, dropped, num_experts=3)
    # rows: expert 0 <- choices 2, 5; expert 1 <- choices 0, 4; then the dropped 1, 3, 6, 7
    assert s.order.tolist() == [2, 5, 0, 4, 1, 3, 6, 7]
    gates = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1], [0.6, 0.4]])
    expert_out = torch.tensor([[1.0], [2.0], [3.0], [4.0], [9.0], [9.0], [9.0], [9.0]])
    expert_out.requires_grad_(True)
    out = combine(expert_out, s, gates)
    # token 0: 0.5 * 3; token 1: 0.25 * 1; token 2: 0.9 * 4 + 0.1 * 2; token 3: nothing.
    torch.testing.assert_close(out[:, 0], torch.tensor([1.5, 0.25, 3.8, 0.0]))
    # The gradient is a gather the other way: each kept row gets its choice's gate, the
    # dropped rows nothing (a grouped GEMM leaves them uninitialised).
    out.sum().backward()
    torch.testing.assert_close(
        expert_out.grad[:, 0], torch.tensor([0.25, 0.1, 0.5, 0.9, 0, 0, 0, 0])
    )


def test_capacity_is_the_exact_ceiling_of_the_expected_load():
    """Against exact rational arithmetic (the capacity factor as the decimal a config writes):
    float noise such as 1.1 * 10 = 11.000000000000002 must not add a slot."""
    cases = [(13, 3, 2, "0.7"), (50, 7, 1, "1.5"), (9, 9, 3, "2.0"), (10, 1, 1, "1.1"),
             (100, 3, 1, "0.3"), (7, 7, 1, "1.05"), (1000, 16, 2, "1.25")]  # fmt: skip
    for n, e, k, cf in cases:
        load = Fraction(k) * Fraction(cf) * n / e
        exact = load.numerator // load.denominator + (load.denominator != 1)  # the ceiling
        assert compute_capacity(n, e, k, float(cf), multiple_of=1) == exact, (n, e, k, cf)
        multiple = next(c for c in range(exact, exact + 4) if c % 4 == 0)
        assert compute_capacity(n, e, k, float(cf), multiple_of=4) == multiple
