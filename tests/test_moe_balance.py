"""Auxiliary-loss-free balancing (a bias per expert, DeepSeek-V3) and sigmoid scores of the
top-k router: updates worked out by hand, a skewed router brought to balance, gates the bias
never touches, counts over processes and over the micro-batches of one optimiser step."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FAST_DEV_RUN
from moe_helpers import bare_layer

from limoe.moe import TopKRouter, bias_routers, route, update_expert_bias
from limoe.train import build_datamodule, build_module, build_trainer, compose

DIM, HIDDEN = 8, 16


def bias_layer(num_experts: int = 4, **options):
    return bare_layer(DIM, HIDDEN, num_experts, capacity_factor=None, balance="bias", **options)


def test_the_bias_update_by_hand():
    """counts [10, 0, 0, 2]: mean 3, sign(mean - count) = [-1, 1, 1, 1], centred by its mean
    0.5: the bias moves by step * [-1.5, 0.5, 0.5, 0.5], and the counts restart."""
    router = TopKRouter(DIM, 4, balance="bias", bias_step=0.01)
    router.expert_tokens.copy_(torch.tensor([[10.0, 0.0, 0.0, 2.0]]))
    router.update_bias()
    torch.testing.assert_close(router.expert_bias, torch.tensor([[-0.015, 0.005, 0.005, 0.005]]))
    assert router.expert_tokens.abs().sum() == 0
    router.expert_tokens.copy_(torch.tensor([[3.0, 3.0, 3.0, 3.0]]))  # balanced: no move
    router.update_bias()
    torch.testing.assert_close(router.expert_bias, torch.tensor([[-0.015, 0.005, 0.005, 0.005]]))


def test_the_bias_picks_the_experts_but_the_gates_stay_the_routers():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 0.4]])
    bias = torch.tensor([[-3.0, 0.0, 0.0]])
    probs, gates, expert_index = route(logits, 1, bias=bias)
    assert expert_index.tolist() == [[1], [1]]  # token 0 leaves expert 0, its top score
    torch.testing.assert_close(gates, probs.gather(1, expert_index))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


def test_a_skewed_router_is_brought_to_balance_without_a_loss():
    """Most tokens start on expert 0; the updates alone (no balancing loss, no gradient)
    spread them, while each token's gate stays its unbiased probability of the expert it
    took."""
    torch.manual_seed(0)
    layer = bias_layer(bias_step=0.01).train()
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
        layer.router.weight[0, 0] += 4.0
    x = torch.randn(256, DIM)
    x[:, 0] = 1.0  # a feature every token has, which the router maps to expert 0
    shares = []
    for _ in range(80):
        _, routing = layer(x)
        shares.append(torch.bincount(routing.expert_index[:, 0], minlength=4).max().item() / 256)
        probs = torch.softmax(layer.router.logits(x), -1)
        chosen = (probs + layer.router.expert_bias).argmax(-1)
        assert torch.equal(routing.expert_index[:, 0], chosen)
        torch.testing.assert_close(routing.gates, probs.gather(1, chosen[:, None]))
        assert update_expert_bias(layer) == 1
    assert shares[0] > 0.6 and max(shares[-10:]) < 0.35  # 0.25: balanced
    assert layer.router.weight.grad is None  # the bias moved, not the router
    assert abs(layer.router.expert_bias.sum().item()) < 1e-5  # centred at every update


def test_counts_per_modality_leave_out_padding_and_evaluation():
    layer = bias_layer(bias_per_modality=True)
    x = torch.randn(10, DIM)
    modality = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    valid = torch.tensor([True] * 8 + [False] * 2)  # the last two text tokens are padding
    _, routing = layer(x, modality, valid=valid)
    expected = torch.zeros(2, 4)
    for m, e, v in zip(modality, routing.expert_index[:, 0], valid):
        expected[m, e] += float(v)
    torch.testing.assert_close(layer.router.expert_tokens, expected)
    assert layer.router.expert_tokens.sum() == 8
    layer.eval()
    layer(x, modality, valid=valid)
    torch.testing.assert_close(layer.router.expert_tokens, expected)  # evaluation counts nothing


def test_one_bias_per_modality_routes_each_modality_by_its_own_row():
    layer = bias_layer(bias_per_modality=True).eval()
    with torch.no_grad():
        layer.router.weight.zero_()  # every probability 1/4: the bias alone decides
        layer.router.expert_bias.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    _, routing = layer(torch.randn(6, DIM), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert routing.expert_index[:, 0].tolist() == [2, 2, 2, 3, 3, 3]
    torch.testing.assert_close(routing.gates, torch.full((6, 1), 0.25))


def test_bias_balancing_sets_the_balancing_losses_to_zero_by_default():
    layer = bias_layer(importance_weight=None, load_weight=None, vmoe_load_weight=None)
    weights = layer.losses
    assert (weights.importance_weight, weights.load_weight, weights.vmoe_load_weight) == (0, 0, 0)
    # persistent: saved and restored with the checkpoint
    assert {"router.expert_bias", "router.expert_tokens"} <= set(layer.state_dict())


def test_sigmoid_scores_by_hand():
    logits = torch.tensor([[0.0, 1.0, -1.0]], requires_grad=True)
    s = torch.sigmoid(logits.detach())
    probs, gates, expert_index = route(logits, 2, renormalize=True, score="sigmoid")
    torch.testing.assert_close(probs, s / s.sum())
    assert expert_index.tolist() == [[1, 0]]
    torch.testing.assert_close(gates, torch.stack([s[0, 1], s[0, 0]])[None] / (s[0, 1] + s[0, 0]))
    # top-1: the renormalised gate is exactly 1 and still passes the router a gradient
    router = TopKRouter(DIM, 3, score="sigmoid", noisy_gating=False)
    assert router.renormalize_gates  # null in the config: renormalised for sigmoid scores
    out = router(torch.randn(5, DIM), None, None, None)
    assert torch.equal(out.gates, torch.ones(5, 1))
    out.gates.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert not TopKRouter(DIM, 3, renormalize_gates=None).renormalize_gates


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"balance": "loss"}, "model.moe.router.balance must be one of aux, bias, got 'loss'"),
        ({"score": "tanh"}, "model.moe.router.score must be one of softmax, sigmoid"),
        ({"balance": "bias", "bias_step": -1}, "bias_step must be a number >= 0, got -1"),
    ],
)
def test_bad_options_fail_with_one_line(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TopKRouter(DIM, 4, **options)


def test_expert_choice_takes_neither_bias_nor_sigmoid():
    with pytest.raises(ValueError, match="router=expert_choice balances by construction"):
        bare_layer(DIM, HIDDEN, 4, router="expert_choice", balance="bias")


def _two_processes(rank: int, path: str, x: torch.Tensor, modality: torch.Tensor, out: str):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    torch.manual_seed(0)
    layer = bias_layer(bias_per_modality=True, bias_step=0.1)
    half = slice(rank * 16, (rank + 1) * 16)
    layer(x[half], modality[half])
    update_expert_bias(layer)
    torch.save(layer.router.expert_bias, f"{out}{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_move_the_bias_as_one_process_with_both_batches(tmp_path):
    torch.manual_seed(1)
    x, modality = torch.randn(32, DIM), torch.randint(0, 2, (32,))
    torch.manual_seed(0)
    one = bias_layer(bias_per_modality=True, bias_step=0.1)
    one(x, modality)
    update_expert_bias(one)
    out = str(tmp_path / "bias")
    mp.spawn(_two_processes, args=(str(tmp_path / "store"), x, modality, out), nprocs=2)
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{out}{rank}.pt"), one.router.expert_bias)
    # each half alone would have moved it elsewhere: the sum over processes is what counts
    alone = bias_layer(bias_per_modality=True, bias_step=0.1)
    alone.router.weight.data.copy_(one.router.weight)
    alone(x[:16], modality[:16])
    update_expert_bias(alone)
    assert not torch.equal(alone.router.expert_bias, one.router.expert_bias)


class ChoicesSeen(L.Callback):
    """Each bias-balanced router's counts, computed on the side from what it chose in every
    training forward since the last update."""

    def __init__(self) -> None:
        self.forwards = 0

    def on_fit_start(self, trainer, module) -> None:
        self.routers = bias_routers(module.model)
        self.pending = [torch.zeros_like(r.expert_tokens) for r in self.routers]
        for i, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(i))

    def take(self) -> list[torch.Tensor]:
        taken = [p.clone() for p in self.pending]
        for p in self.pending:
            p.zero_()
        return taken

    def _hook(self, i: int):
        def hook(router, args, out) -> None:
            if router.training:
                self.forwards += i == 0
                valid = args[4]
                chosen = torch.nn.functional.one_hot(out.expert_index, router.num_experts).sum(1)
                self.pending[i][0] += (chosen * valid[:, None]).sum(0).float()

        return hook


def test_gradient_accumulation_updates_once_per_optimiser_step_from_every_micro_batch(
    tmp_path, monkeypatch
):
    import limoe.lit.module as lit_module

    seen, updates = ChoicesSeen(), []

    def update(model):  # what each update consumes, against what the routers chose since
        updates.append(([r.expert_tokens.clone() for r in seen.routers], seen.take()))
        return update_expert_bias(model)

    monkeypatch.setattr(lit_module, "update_expert_bias", update)
    cfg = compose(["experiment=smoke", "trainer=cpu", "model.moe.router.balance=bias",
                   "+trainer.accumulate_grad_batches=2", "trainer.max_steps=2",
                   "~callbacks", "~logger", "trainer.enable_progress_bar=false", "test=false",
                   "+trainer.limit_val_batches=0", "trainer.enable_model_summary=false"],
                  tmp_path)  # fmt: skip
    L.seed_everything(0)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    build_trainer(cfg, callbacks=[seen]).fit(module, datamodule=datamodule)
    assert seen.forwards == 4 and len(updates) == 2  # 4 micro-batches, 2 optimiser steps
    for counted, chosen in updates:
        for got, expected in zip(counted, chosen):
            torch.testing.assert_close(got, expected)
    assert all(r.expert_bias.abs().sum() > 0 for r in seen.routers)
    assert all(r.expert_tokens.abs().sum() == 0 for r in seen.routers)


def test_bias_balancing_trains_from_the_config(tmp_path):
    cfg = compose(["experiment=smoke", "trainer=cpu", "model.moe.router.balance=bias",
                   "model.moe.router.score=sigmoid",
                   *FAST_DEV_RUN], tmp_path)  # fmt: skip
    L.seed_everything(0)
    datamodule = build_datamodule(cfg)
    module, trainer = build_module(cfg, datamodule), build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule)
    routers = bias_routers(module.model)
    assert len(routers) == len(module.model.moe_layers) and routers[0].score == "sigmoid"
    # one step of 1e-3 (the default step), centred: every entry moved by a multiple of 1e-3/E
    for router in routers:
        steps = router.expert_bias * router.num_experts / 1e-3
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().sum() > 0
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert module.model.blocks[0].mlp.losses.importance_weight == 0  # no balancing loss
