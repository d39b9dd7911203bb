"""The two other routers: expert choice (experts pick tokens) and Soft MoE (weighted slots),
against selections worked out by hand and per-group loop references."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch
from conftest import FAST_DEV_RUN
from moe_helpers import bare_layer, expert_mlp, make_layer, outputs_and_grads, randomise

from limoe.models import LIMoE
from limoe.moe import (
    ROUTERS,
    MoELayer,
    RouterLosses,
    Routing,
    expert_choice,
    layer_summary,
    pack_groups,
    routing_stats,
)
from limoe.train import build_datamodule, build_module, build_trainer, compose

DIM, HIDDEN = 8, 16


def test_expert_choice_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    expert_index, gates, position, dropped = expert_choice(probs, capacity=2)
    # Expert 0 picks tokens 0, 1 (slots 0, 1); expert 1 picks tokens 3, 2 (slots 0, 1).
    assert expert_index.tolist() == [[0, 1], [0, 1], [1, 0], [1, 0]]
    torch.testing.assert_close(
        gates, torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
    )
    assert position.tolist() == [[0, 2], [1, 2], [1, 2], [0, 2]]
    assert dropped.tolist() == [[False, True]] * 4


def test_expert_choice_serves_a_token_twice_or_not_at_all():
    # (Scores need not sum to 1 for the selection.) Token 0 is the second pick of both
    # experts; token 3 is below it for both, so nobody's.
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9], [0.3, 0.3]])
    _, _, _, dropped = expert_choice(probs, capacity=2)
    assert (~dropped).sum(-1).tolist() == [2, 1, 1, 0]
    # Capacity above the token count: every expert takes every token.
    _, _, _, dropped = expert_choice(probs, capacity=8)
    assert not dropped.any()


def naive_expert_choice(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Per-expert loops: expert e takes the C tokens of highest probs[:, e]."""
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)
    _, routing = layer(x)
    y = torch.zeros_like(x)
    for e in range(layer.num_experts):
        ranked = sorted(range(x.shape[0]), key=lambda i: -probs[i, e].item())
        for i in ranked[: routing.capacity]:
            y[i] += probs[i, e] * expert_mlp(layer, e, x[i])
    return y


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 8.0])
def test_expert_choice_layer_against_per_expert_loops(capacity_factor):
    torch.manual_seed(3)
    layer = randomise(bare_layer(DIM, HIDDEN, 4, router="expert_choice",
                               capacity_factor=capacity_factor, capacity_multiple=1))  # fmt: skip
    x = torch.randn(12, DIM)
    y, routing = layer(x)
    assert routing.expert_index.shape == (12, 4)
    assert (~routing.dropped).sum().item() == 4 * min(routing.capacity, 12)
    torch.testing.assert_close(y, naive_expert_choice(layer, x), rtol=1e-5, atol=1e-5)


def test_expert_choice_sorted_equals_onehot_reference():
    torch.manual_seed(4)
    layer = randomise(bare_layer(DIM, HIDDEN, 4, router="expert_choice", capacity_multiple=1))
    x, probe = torch.randn(20, DIM), torch.randn(20, DIM)
    y, x_grad, grads, _ = outputs_and_grads(layer, x, "sorted", probe)
    y_ref, x_grad_ref, grads_ref, _ = outputs_and_grads(layer, x, "onehot", probe)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, x_grad_ref, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_expert_choice_needs_a_capacity_factor():
    with pytest.raises(ValueError, match="router=expert_choice needs a capacity_factor"):
        bare_layer(DIM, HIDDEN, 4, router="expert_choice", capacity_factor=None)


def test_pack_groups_by_hand():
    group, row, num_groups, length = pack_groups(torch.tensor([7, 2, 7, 7, 2]), 5)
    assert group.tolist() == [1, 0, 1, 1, 0] and row.tolist() == [0, 0, 1, 2, 1]
    assert (num_groups, length) == (2, 3)


def naive_soft_moe(layer: MoELayer, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Soft MoE one group at a time, as the paper writes it (per sequence)."""
    p = layer.router.slots_per_expert
    y = torch.zeros_like(x)
    for g in group.unique():
        members = (group == g).nonzero().squeeze(-1)
        xg = x[members]
        # vmoe's SoftRouter: unit tokens against unit slot parameters, times a learned scale.
        unit_x = xg / (xg.square().sum(-1, keepdim=True) + 1e-6).sqrt()
        mu = layer.router.weight
        unit_mu = mu / (mu.square().sum(-1, keepdim=True) + 1e-6).sqrt()
        logits = layer.router.scale * unit_x @ unit_mu.T  # [n, E * p]
        dispatch, combine = logits.softmax(dim=0), logits.softmax(dim=1)
        slots = dispatch.T @ xg
        out = torch.stack([expert_mlp(layer, s // p, slots[s]) for s in range(slots.shape[0])])
        y[members] = combine @ out
    return y


@pytest.mark.parametrize("slots_per_expert", [1, 2])
def test_soft_moe_against_per_group_loops(slots_per_expert):
    torch.manual_seed(5)
    layer = randomise(bare_layer(DIM, HIDDEN, 3, router="soft", slots_per_expert=slots_per_expert))
    x, probe = torch.randn(11, DIM), torch.randn(11, DIM)
    group = torch.tensor([4, 1, 4, 4, 9, 1, 9, 9, 9, 4, 1])  # uneven, interleaved, sparse ids
    grads = []
    for forward in (lambda x_in: layer(x_in, sequence=group)[0],
                    lambda x_in: naive_soft_moe(layer, x_in, group)):  # fmt: skip
        layer.zero_grad()
        x_in = x.clone().requires_grad_(True)
        y = forward(x_in)
        (y * probe).sum().backward()
        grads.append([y.detach(), x_in.grad] + [p.grad for p in layer.parameters()])
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_soft_moe_keeps_groups_apart_and_records_its_routing():
    torch.manual_seed(6)
    layer = randomise(bare_layer(DIM, HIDDEN, 4, router="soft", slots_per_expert=2))
    x = torch.randn(10, DIM)
    group = torch.tensor([0] * 6 + [1] * 4)
    y, routing = layer(x, sequence=group)
    changed = x.clone()
    changed[6:] = torch.randn(4, DIM)  # another group 1
    torch.testing.assert_close(layer(changed, sequence=group)[0][:6], y[:6])
    # Within a group, permuting tokens permutes outputs.
    perm = torch.tensor([5, 3, 1, 0, 2, 4, 6, 7, 8, 9])
    torch.testing.assert_close(layer(x[perm], sequence=group)[0], y[perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(10))
    assert torch.equal(routing.expert_index[:, 0], routing.probs.argmax(-1))
    assert not routing.dropped.any() and routing.capacity is None
    # An image and its caption share a sequence id; the modality keeps them apart too.
    modality = torch.tensor([0] * 3 + [1] * 3 + [0] * 4)
    y_mixed = layer(x, modality, group)[0]
    changed = x.clone()
    changed[3:6] = torch.randn(3, DIM)  # another caption for sequence 0
    torch.testing.assert_close(layer(changed, modality, group)[0][:3], y_mixed[:3])
    with pytest.raises(ValueError, match="sequence must hold one integer id per token"):
        layer(x, sequence=torch.zeros(9, dtype=torch.long))


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_limoe_with_router_keeps_pairs_and_modalities_apart(router):
    """Soft MoE groups each image and each caption on its own, so an image's embedding depends
    on neither its caption nor the other pairs; with expert choice it depends on the batch
    (experts pick among all tokens), as the method is."""
    torch.manual_seed(7)
    moe = {"num_experts": 4, "router": ROUTERS[router], "capacity_factor": 1.0}
    model = LIMoE(embed_dim=16, image_size=16, patch_size=8, width=16, depth=2, num_heads=2,
                  context_length=8, vocab_size=100, moe_layers=[1], moe=moe,
                  output_dict=True).eval()  # fmt: skip
    images, tokens = torch.randn(3, 3, 16, 16), torch.randint(1, 99, (3, 8))
    tokens[:, 4], tokens[:, 5:] = 99, 0  # end of text (the largest id) at position 4
    out = model(images, tokens)
    routing = out["routing"][0].real()
    if router == "expert_choice":
        # 3 x 4 patches and 3 x 5 real caption tokens: 27 tokens, C = ceil(27 / 4) = 7,
        # rounded up to a multiple of 4: every expert takes exactly 8 of them.
        assert routing.expert_index.shape == (27, 4) and routing.capacity == 8
        kept = routing.expert_index[~routing.dropped]
        assert torch.bincount(kept, minlength=4).tolist() == [8, 8, 8, 8]
        # ... its 8 most probable tokens (no token outside them beats the last one taken).
        for e in range(4):
            taken = ((routing.expert_index == e) & ~routing.dropped).any(1)
            assert routing.probs[taken, e].min() >= routing.probs[~taken, e].max()
    if router == "soft":
        alone = model(images[:1], tokens[[2]])
        torch.testing.assert_close(alone["image_features"][0], out["image_features"][0])
        alone = model(images[[2]], tokens[:1])
        torch.testing.assert_close(alone["text_features"][0], out["text_features"][0])


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_router_choice_trains_from_the_config(router, tmp_path):
    """``router@model.moe.router=...`` through the real configs: one Lightning step moves the router
    and the experts."""
    cfg = compose(["experiment=smoke", "trainer=cpu", f"router@model.moe.router={router}",
                   "model.moe.capacity_factor=1.0", *FAST_DEV_RUN], tmp_path)  # fmt: skip
    L.seed_everything(0)
    datamodule = build_datamodule(cfg)
    module, trainer = build_module(cfg, datamodule), build_trainer(cfg)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert {"blocks.2.mlp.router.weight", "blocks.2.mlp.experts.w1"} <= changed


def test_soft_router_is_vmoes_normalised_router():
    """Slot logits are ``scale * cos(x, mu)``: blind to the token's norm, bounded by the
    learned scale, and the scale learns (vmoe's SoftRouter)."""
    torch.manual_seed(8)
    layer = bare_layer(DIM, HIDDEN, 3, router="soft", slots_per_expert=2)
    x = torch.randn(5, DIM)
    logits = layer.router.logits(x)
    cosine = torch.nn.functional.cosine_similarity(
        x[:, None, :], layer.router.weight[None, :, :], dim=-1
    )
    torch.testing.assert_close(logits, cosine, rtol=1e-5, atol=1e-6)  # scale starts at 1
    torch.testing.assert_close(layer.router.logits(50.0 * x), logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layer.router.scale.fill_(3.0)
    torch.testing.assert_close(layer.router.logits(x), 3.0 * cosine, rtol=1e-5, atol=1e-6)
    layer(x, sequence=torch.tensor([0, 0, 1, 1, 1]))[0].square().sum().backward()
    assert layer.router.scale.grad is not None and layer.router.scale.grad != 0


def expert_choice_record(probs: torch.Tensor, capacity: int, modality: list[int]) -> Routing:
    expert_index, gates, _, dropped = expert_choice(probs, capacity)
    zero = torch.zeros(())
    return Routing(expert_index, gates, dropped, probs, torch.tensor(modality), capacity, {},
                   zero, router="expert_choice", experts_choose=True)  # fmt: skip


def test_expert_choice_statistics_count_kept_choices():
    """Worked by hand: two experts, capacity 1, images 0-1 and texts 2-3. Expert 0 picks token
    0 (p=.9), expert 1 token 3 (p=.8); tokens 1 and 2 are picked by nobody. Each modality then
    loses half its tokens, and its one kept choice is all of its share."""
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]])
    routing = expert_choice_record(probs, 1, [0, 0, 1, 1])
    stats = routing_stats([routing], [2])
    assert {k: round(float(v), 6) for k, v in stats.items()} == {
        "routing/layer2/expert0/image": 1.0, "routing/layer2/expert0/text": 0.0,
        "routing/layer2/expert1/image": 0.0, "routing/layer2/expert1/text": 1.0,
        "dropped/image": 0.5, "dropped/text": 0.5,
    }  # fmt: skip
    summary = layer_summary(routing, threshold=0.9)
    assert summary["dropped"] == {"image": 0.5, "text": 0.5}
    assert summary["share"] == {"image": [1.0, 0.0], "text": [0.0, 1.0]}
    assert summary["kind"] == ["image", "text"]
    # With capacity 2 every token is picked: nothing is dropped, though each token was turned
    # down by one of its two experts (the old statistics read 0.5 here).
    full = routing_stats([expert_choice_record(probs, 2, [0, 0, 1, 1])], [2])
    assert float(full["dropped/image"]) == float(full["dropped/text"]) == 0.0
    # A top-k record with the same choices still counts choices over capacity.
    topk = replace(
        expert_choice_record(probs, 1, [0, 0, 1, 1]), router="topk", experts_choose=False
    )
    assert float(routing_stats([topk], [2])["dropped/image"]) == 0.75


def test_expert_choice_layer_drops_nothing_it_was_built_to_keep():
    """At capacity factor 1 over E = 16 experts the old statistics read dropped ~ 0.94."""
    torch.manual_seed(9)
    layer = bare_layer(DIM, HIDDEN, 16, router="expert_choice", capacity_factor=1.0)
    modality = torch.tensor([0] * 48 + [1] * 16)
    _, routing = layer(torch.randn(64, DIM), modality=modality)
    unpicked = routing.dropped.all(dim=1)
    stats = routing_stats([routing], [0])
    for m, name in enumerate(("image", "text")):
        want = unpicked[modality == m].float().mean()
        torch.testing.assert_close(stats[f"dropped/{name}"], want)
        shares = torch.stack([stats[f"routing/layer0/expert{e}/{name}"] for e in range(16)])
        torch.testing.assert_close(shares.sum(), torch.tensor(1.0))
    assert float(stats["dropped/image"]) < 0.5


def test_expert_choice_and_soft_train_without_a_balancing_loss_unless_asked():
    classic = ("importance", "load", "vmoe_load")
    for router in ("expert_choice", "soft"):
        layer = make_layer(DIM, HIDDEN, 4, router=router, capacity_factor=1.0)
        assert [layer.losses.weights[name] for name in classic] == [0.0, 0.0, 0.0]
        asked = make_layer(DIM, HIDDEN, 4, router=router, capacity_factor=1.0, load_weight=0.02)
        assert asked.losses.weights["load"] == 0.02
    # top-k routing balances with V-MoE's importance and load losses (at 0.02), no Switch load
    topk = make_layer(DIM, HIDDEN, 4).losses.weights
    assert [topk[name] for name in classic] == [0.02, 0.0, 0.02]
    unset = RouterLosses().for_router(0.02).weights
    assert {k: unset[k] for k in classic} == {"importance": 0.02, "load": 0.0, "vmoe_load": 0.02}
    assert make_layer(DIM, HIDDEN, 4, importance_weight=0.0).losses.weights["importance"] == 0.0
