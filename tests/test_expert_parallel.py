"""Expert parallelism on 2 CPU processes (gloo): the sharded layer's outputs and gradients
equal the single-process layer's with the same weights, and state dicts hold every expert;
the expert weights stay out of DDP's gradient reduction."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moe_helpers import bare_layer

from limoe.lit.parallel import exclude_from_ddp
from limoe.moe import MoELayer

WORLD = 2
TOKENS = (20, 13)  # uneven token counts per rank
DIM, HIDDEN, EXPERTS = 8, 16, 4
CASES = {
    "top1-dropless": {"top_k": 1, "capacity_factor": None},
    "top2-capacity-bpr": {"top_k": 2, "capacity_factor": 1.0, "capacity_multiple": 1},
    "expert-choice": {"router": "expert_choice", "capacity_factor": 1.0, "capacity_multiple": 1},
}


def make_layer(case: str) -> MoELayer:
    torch.manual_seed(0)
    layer = bare_layer(DIM, HIDDEN, EXPERTS, expert_parallel=True, load_weight=0.1,
                     local_entropy_weight=0.1, **CASES[case])  # fmt: skip
    with torch.no_grad():  # distinct experts, so a wrong expert shows
        for p in layer.experts.parameters():
            p.normal_(0, 0.5)
    return layer


def inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    n = TOKENS[rank]
    x = torch.randn(n, DIM, generator=generator)
    modality = torch.randint(0, 2, (n,), generator=generator)
    weight = torch.randn(n, DIM, generator=generator)  # loss = <y, weight> + aux
    return x, modality, weight


def loss_of(layer: MoELayer, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, modality, weight = inputs(rank)
    x.requires_grad_()
    y, routing = layer(x, modality)
    return (y * weight).sum() + routing.aux_loss, y, x


def worker(rank: int, case: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    layer = make_layer(case)
    layer.shard(rank, WORLD)
    loss, y, x = loss_of(layer, rank)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    state = layer.state_dict()  # a collective: every rank takes part
    fresh = make_layer(case)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.shard(rank, WORLD)
    fresh.load_state_dict(state)
    loaded = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    torch.save({"y": y.detach(), "x_grad": x.grad, "grads": grads, "state": state,
                "loaded": loaded}, f"{out}/rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", CASES)
def test_sharded_layer_equals_the_single_process_layer(case, tmp_path):
    mp.spawn(worker, args=(case, free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    full = make_layer(case)
    # Reference: the unsharded layer on each rank's tokens (routing and capacity are each
    # process's own decisions); expert gradients sum both ranks' losses.
    total = torch.zeros(())
    local = {}
    for rank in range(WORLD):
        layer = copy.deepcopy(full)
        loss, y, x = loss_of(layer, rank)
        loss.backward()
        total = total + loss_of(full, rank)[0]
        local[rank] = (y.detach(), x.grad, layer.router.weight.grad)
    total.backward()
    block = EXPERTS // WORLD
    for rank, got in enumerate(ranks):
        y, x_grad, router_grad = local[rank]
        torch.testing.assert_close(got["y"], y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["x_grad"], x_grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["grads"]["router.weight"], router_grad, rtol=1e-5, atol=1e-5)
        mine = slice(rank * block, (rank + 1) * block)
        for name in ("w1", "b1", "w2", "b2"):
            expected = getattr(full.experts, name).grad[mine]
            got_grad = got["grads"][f"experts.{name}"]
            assert got_grad.shape[0] == block
            torch.testing.assert_close(got_grad, expected, rtol=1e-5, atol=1e-5, msg=name)
            # The state dict holds all experts (the initial weights), on every rank; loading
            # it into a sharded layer keeps this rank's block.
            torch.testing.assert_close(
                got["state"][f"experts.{name}"], getattr(full.experts, name).detach()
            )
            torch.testing.assert_close(
                got["loaded"][f"experts.{name}"], getattr(full.experts, name).detach()[mine]
            )
    assert any(got["grads"]["experts.w1"].abs().sum() > 0 for got in ranks)


def test_expert_parallel_needs_sorted_topk_or_expert_choice():
    with pytest.raises(ValueError, match="expert_parallel needs dispatch=sorted"):
        bare_layer(DIM, HIDDEN, EXPERTS, expert_parallel=True, router="soft", capacity_factor=None)
    with pytest.raises(ValueError, match="expert_parallel needs dispatch=sorted"):
        bare_layer(DIM, HIDDEN, EXPERTS, expert_parallel=True, dispatch="onehot")
    layer = bare_layer(DIM, HIDDEN, EXPERTS, expert_parallel=True)
    layer.shard(0, 1)  # one process: every expert stays
    assert layer.experts.w1.shape[0] == EXPERTS and layer.experts.parallel is None


class PartlyUsed(torch.nn.Module):
    """One linear layer used in forward, one not (as an expert block DDP must not average)."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def ddp_two_steps(rank: int, port: int, out: str) -> None:
    """Two DDP steps of ``PartlyUsed`` with and without ``exclude_from_ddp``; DDP (without
    ``find_unused_parameters``) refuses the second step while it waits for ``unused``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    outcome = {}
    for excluded in (False, True):
        module = PartlyUsed()
        if excluded:
            exclude_from_ddp(module, ["unused.weight", "unused.bias"])
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        try:
            for _ in range(2):
                ddp(torch.ones(1, 2)).sum().backward()
            outcome[excluded] = "ok"
        except RuntimeError as error:
            outcome[excluded] = str(error).split(".")[0]
    torch.save(outcome, out)
    dist.destroy_process_group()


def test_exclude_from_ddp_keeps_parameters_out_of_ddp(tmp_path):
    """The one use of torch's private ``_set_params_and_buffers_to_ignore_for_model``: this
    fails if it stops keeping the expert weights out of DDP's gradient reduction."""
    out = tmp_path / "outcome.pt"
    mp.spawn(ddp_two_steps, args=(free_port(), str(out)), nprocs=1)
    outcome = torch.load(out)
    assert outcome[True] == "ok"
    assert "Expected to have finished reduction in the prior iteration" in outcome[False]
