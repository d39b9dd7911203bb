"""Aux losses against hand-computed values and a plain-Python loop reference."""

import math

import numpy as np
import pytest
import torch
from moe_helpers import bare_layer, make_layer

from limoe.moe import (
    LOSS_NAMES,
    RouterLosses,
    RouterScores,
    global_entropy_loss,
    importance_loss,
    load_loss,
    local_entropy_loss,
    vmoe_load_loss,
    z_loss,
)
from limoe.moe.losses import entropy

# Four tokens, three experts; top-1 choices are experts 0, 1, 0, 2.
PROBS = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.25, 0.25, 0.5]]
SHIFTS = [0.0, 1.0, 2.0, -1.0]  # logits = log(probs) + shift, so logsumexp = shift


def losses_of(logits, probs, index, modality=None, min_experts=(1.0,), clean=None,
              noise_std=0.0, scope="modality"):  # fmt: skip
    """A layer's raw losses (``RouterLosses``) of router scores given by hand; ``clean``: the
    logits before gating noise of std ``noise_std`` (None: no noise)."""
    scores = RouterScores(logits, probs, logits if clean is None else clean, index, noise_std)
    losses = RouterLosses(global_entropy_min_experts=min_experts, scope=scope)
    return losses(scores, modality)


def hand_probs():
    probs = torch.tensor(PROBS)
    logits = probs.log() + torch.tensor(SHIFTS).unsqueeze(-1)
    return logits, probs, probs.argmax(-1)


def h(p):
    return -sum(q * math.log(q) for q in p if q > 0)


def test_importance_by_hand():
    _, probs, _ = hand_probs()
    # imp = column sums = [1.65, 1.55, 0.8], mean 4/3, population variance / mean^2.
    mean = 4 / 3
    var = ((1.65 - mean) ** 2 + (1.55 - mean) ** 2 + (0.8 - mean) ** 2) / 3
    assert importance_loss(probs).item() == pytest.approx(var / mean**2, rel=1e-5)
    assert importance_loss(probs).item() == pytest.approx(0.0809375, rel=1e-5)


def test_load_by_hand():
    _, probs, top1 = hand_probs()
    # f = [2, 1, 1] / 4, P = [1.65, 1.55, 0.8] / 4 -> 3 * (0.20625 + 0.096875 + 0.05)
    assert load_loss(probs, top1).item() == pytest.approx(1.059375, rel=1e-5)


def test_vmoe_load_by_hand():
    """Two tokens, two experts, noise std 0.5. Token 0: clean (1, 0), noisy (1.2, -0.1), so
    the top-1 threshold is 1.2 and the experts clear it with Phi(-0.4) = 0.34458 and
    Phi(-2.4) = 0.00820; token 1: clean (0, 0), noisy (0.3, 0.4), threshold 0.4, each expert
    Phi(-0.8) = 0.21186. Means (0.27822, 0.11003): CV^2 = 0.18767."""
    clean = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    noisy = torch.tensor([[1.2, -0.1], [0.3, 0.4]])
    assert vmoe_load_loss(clean, noisy, 0.5, top_k=1).item() == pytest.approx(0.18767, abs=1e-5)
    assert vmoe_load_loss(clean, noisy, 0.0, top_k=1).item() == 0.0  # no noise: undefined, 0
    # top-2 of two experts: the threshold is the smaller noisy logit, -0.1 and 0.3
    expected = cv2([(phi(1.1 / 0.5) + phi(-0.3 / 0.5)) / 2, (phi(0.1 / 0.5) + phi(-0.3 / 0.5)) / 2])
    assert vmoe_load_loss(clean, noisy, 0.5, top_k=2).item() == pytest.approx(expected, rel=1e-5)


def test_importance_reads_the_clean_probabilities():
    logits, probs, top1 = hand_probs()
    noisy = logits + torch.tensor([[3.0, 0.0, 0.0]])  # the noise makes expert 0 win everywhere
    losses = losses_of(noisy, noisy.softmax(-1), noisy.argmax(-1, keepdim=True),
                       clean=logits, noise_std=1.0)  # fmt: skip
    assert losses["importance"].item() == pytest.approx(0.0809375, rel=1e-5)  # the clean value
    ref = loop_losses(noisy.tolist(), noisy.softmax(-1).tolist(), 1.0, logits.tolist(), 1.0)
    for name in LOSS_NAMES:
        assert losses[name].item() == pytest.approx(ref[name], rel=1e-4, abs=1e-6), name


def test_scope_all_balances_every_token_and_keeps_entropy_per_modality():
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(12, 4, generator=gen)
    noisy = clean + 0.25 * torch.randn(12, 4, generator=gen)
    probs, index = noisy.softmax(-1), noisy.topk(2).indices
    modality = torch.tensor([0] * 9 + [1] * 3)  # image tokens outnumber text 3 to 1
    losses = losses_of(noisy, probs, index, modality, (2.0, 1.5), clean=clean, noise_std=0.25,
                       scope="all")  # fmt: skip
    classic = ("importance", "load", "vmoe_load", "z_loss")
    entropies = ("local_entropy", "global_entropy")
    assert set(losses) == set(classic) | {f"{n}/{m}" for n in entropies for m in ("image", "text")}
    every = loop_losses(noisy.tolist(), probs.tolist(), 2.0, clean.tolist(), 0.25, top_k=2)
    for name in classic:
        assert losses[name].item() == pytest.approx(every[name], rel=1e-4, abs=1e-6), name
    for m, name in enumerate(("image", "text")):
        rows = modality == m
        own = loop_losses(noisy[rows].tolist(), probs[rows].tolist(), (2.0, 1.5)[m])
        for loss in entropies:
            assert losses[f"{loss}/{name}"].item() == pytest.approx(own[loss], rel=1e-4)
    with pytest.raises(ValueError, match="scope must be one of"):
        losses_of(noisy, probs, index, modality, scope="batch")


def test_layer_vmoe_load_uses_its_own_noise():
    layer = bare_layer(8, 16, 4, noisy_gating=True, vmoe_load_weight=1.0, scope="all")
    layer.train()
    x, modality = torch.randn(10, 8), torch.tensor([0] * 7 + [1] * 3)
    torch.manual_seed(3)
    _, routing = layer(x, modality)
    clean = layer.router.logits(x).detach()
    torch.manual_seed(3)  # the gating noise is the forward's first random draw
    noisy = clean + torch.randn_like(clean) / 4
    # vmoe's _load_auxiliary_loss by hand: a token's threshold is its top noisy logit; expert
    # e clears it with probability Phi((clean_e - threshold) / std); CV^2 of the means.
    cleared = [[phi((c - max(row)) / 0.25) for c in clean_row]
               for clean_row, row in zip(clean.tolist(), noisy.tolist())]  # fmt: skip
    expected = cv2([sum(column) / len(cleared) for column in zip(*cleared)])
    assert routing.aux_losses["vmoe_load"].item() == pytest.approx(expected, rel=1e-4)
    assert expected > 0 and routing.aux_loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("s", [1.0, 0.5, 5.0])
def test_global_entropy_threshold_outside_one_to_num_experts_fails(s):
    with pytest.raises(ValueError, match=r"global_entropy_min_experts must be in \(1, "
                       r"num_experts=4\] while global_entropy_weight > 0"):  # fmt: skip
        make_layer(8, 16, 4, global_entropy_weight=0.01, global_entropy_min_experts=s)
    make_layer(8, 16, 4, global_entropy_weight=0.0, global_entropy_min_experts=max(s, 0.5))
    make_layer(8, 16, 4, global_entropy_weight=0.01, global_entropy_min_experts=4.0)


def test_z_loss_by_hand():
    logits, _, _ = hand_probs()
    # logsumexp_i = shift_i -> mean(0, 1, 4, 1) = 1.5
    assert z_loss(logits).item() == pytest.approx(1.5, rel=1e-5)
    probs = torch.softmax(logits, dim=-1)
    assert z_loss(logits, probs).item() == pytest.approx(1.5, rel=1e-5)


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_z_loss_from_the_largest_probability_equals_logsumexp(scale):
    """The router's path (lse read off the top logit and its probability) against
    torch.logsumexp: the value and the gradient, from nearly uniform to saturated rows."""
    torch.manual_seed(0)
    logits = (torch.randn(64, 8) * scale).requires_grad_()
    reference = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    (want,) = torch.autograd.grad(reference, logits)
    got_value = z_loss(logits, torch.softmax(logits, dim=-1))
    (got,) = torch.autograd.grad(got_value, logits)
    torch.testing.assert_close(got_value, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_local_entropy_by_hand():
    _, probs, _ = hand_probs()
    expected = (
        h([0.7, 0.2, 0.1]) + h([0.1, 0.8, 0.1]) + h([0.6, 0.3, 0.1]) + h([0.25] * 2 + [0.5])
    ) / 4
    assert local_entropy_loss(probs).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx((0.8018 + 0.6390 + 0.8979 + 1.0397) / 4, abs=1e-4)


def test_global_entropy_by_hand():
    _, probs, _ = hand_probs()
    h_mean = h([0.4125, 0.3875, 0.2])  # ~1.0537 nats, i.e. ~2.87 "effective experts"
    assert global_entropy_loss(probs, 3.0).item() == pytest.approx(math.log(3) - h_mean, rel=1e-4)
    assert global_entropy_loss(probs, 2.0).item() == 0.0  # spread over >= 2 experts: no loss
    assert global_entropy_loss(probs, 1.0).item() == 0.0  # tau = 0 never fires


def test_uniform_and_collapsed_routing():
    uniform = torch.full((6, 4), 0.25)
    assert importance_loss(uniform).item() == pytest.approx(0.0, abs=1e-7)
    assert load_loss(uniform, torch.tensor([0, 1, 2, 3, 0, 1])).item() == pytest.approx(1.0)
    assert local_entropy_loss(uniform).item() == pytest.approx(math.log(4))
    assert global_entropy_loss(uniform, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 6)
    top1 = torch.zeros(6, dtype=torch.long)
    assert importance_loss(collapsed).item() == pytest.approx(
        3.0
    )  # imp=[6,0,0,0]: (sqrt(3)*1.5/1.5)^2
    assert load_loss(collapsed, top1).item() == pytest.approx(4.0)  # E * 1 * 1
    assert local_entropy_loss(collapsed).item() == 0.0
    assert global_entropy_loss(collapsed, 2.5).item() == pytest.approx(math.log(2.5))


def test_entropy_of_zero_probability_has_finite_grad():
    p = torch.tensor([1.0, 0.0], requires_grad=True)
    value = entropy(p)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(p.grad).all()


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def cv2(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / mean**2


def softmax(row):
    exps = [math.exp(v - max(row)) for v in row]
    return [v / sum(exps) for v in exps]


def loop_losses(logits, probs, min_experts, clean=None, noise_std=0.0, top_k=1):
    """Independent plain-Python implementation of all six losses for one token group;
    ``clean``: the logits before noise (default: ``logits``)."""
    n, e = len(probs), len(probs[0]) if probs else 0
    if n == 0:
        return dict.fromkeys(LOSS_NAMES, 0.0)
    clean = clean or logits
    clean_probs = [softmax(row) for row in clean]
    imp = [sum(probs[i][j] for i in range(n)) for j in range(e)]
    clean_imp = [sum(clean_probs[i][j] for i in range(n)) for j in range(e)]
    top1 = [max(range(e), key=lambda j, i=i: probs[i][j]) for i in range(n)]
    f = [top1.count(j) / n for j in range(e)]
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits]
    vmoe_load = 0.0
    if noise_std > 0:
        thresholds = [sorted(row, reverse=True)[top_k - 1] for row in logits]
        above = [[phi((clean[i][j] - thresholds[i]) / noise_std) for j in range(e)]
                 for i in range(n)]  # fmt: skip
        vmoe_load = cv2([sum(above[i][j] for i in range(n)) / n for j in range(e)])
    return {
        "importance": cv2(clean_imp),
        "load": e * sum(f[j] * imp[j] / n for j in range(e)),
        "vmoe_load": vmoe_load,
        "z_loss": sum(v * v for v in lse) / n,
        "local_entropy": sum(h(row) for row in probs) / n,
        "global_entropy": max(0.0, math.log(min_experts) - h([v / n for v in imp])),
    }


def test_per_modality_matches_loop_reference():
    gen = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(20, 5, generator=gen)
    probs = logits.softmax(-1)
    modality = torch.randint(0, 2, (20,), generator=gen)
    min_experts = (4.5, 2.0)
    losses = losses_of(logits, probs, probs.topk(2).indices, modality, min_experts)
    assert set(losses) == {f"{n}/{m}" for n in LOSS_NAMES for m in ("image", "text")}
    for m, name in enumerate(("image", "text")):
        rows = [i for i in range(20) if modality[i] == m]
        ref = loop_losses(logits[rows].tolist(), probs[rows].tolist(), min_experts[m])
        for loss_name in LOSS_NAMES:
            got = losses[f"{loss_name}/{name}"].item()
            assert got == pytest.approx(ref[loss_name], rel=1e-4, abs=1e-6), loss_name
    assert losses["global_entropy/image"].item() > 0  # S=4.5 of 5 experts: the loss fires


def test_without_modality_one_group_and_plain_keys():
    logits, probs, top1 = hand_probs()
    losses = losses_of(logits, probs, top1.unsqueeze(-1), min_experts=(3.0,))
    assert set(losses) == set(LOSS_NAMES)
    ref = loop_losses(logits.tolist(), probs.tolist(), 3.0)
    for name in LOSS_NAMES:
        assert losses[name].item() == pytest.approx(ref[name], rel=1e-4, abs=1e-6)


def test_empty_modality_gives_zero_and_no_nan_grad():
    layer = bare_layer(
        8,
        16,
        4,
        importance_weight=1,
        load_weight=1,
        z_loss_weight=1,
        local_entropy_weight=1,
        global_entropy_weight=1,
        global_entropy_min_experts=3.0,
        scope="modality",
    )
    x = torch.randn(6, 8)
    _, routing = layer(x, torch.zeros(6, dtype=torch.long))  # no text tokens
    for name in LOSS_NAMES:
        assert routing.aux_losses[f"{name}/text"].item() == 0.0
    assert torch.isfinite(routing.aux_loss)
    routing.aux_loss.backward()
    assert torch.isfinite(layer.router.weight.grad).all()
    assert layer.router.weight.grad.abs().sum() > 0


def test_the_total_weighs_each_loss_by_its_name_by_hand():
    losses = RouterLosses(importance_weight=0.5, load_weight=0.25, local_entropy_weight=0.0,
                          global_entropy_weight=2.0)  # fmt: skip
    raw = {"importance": torch.tensor(2.0), "load/image": torch.tensor(4.0),
           "load/text": torch.tensor(8.0), "local_entropy/text": torch.tensor(100.0),
           "global_entropy/image": torch.tensor(0.125)}  # fmt: skip
    # 0.5 * 2 + 0.25 * (4 + 8) + 0 * 100 + 2 * 0.125
    assert losses.total(raw).item() == 4.25
    assert losses.total({}).item() == 0.0


def test_layer_aux_loss_is_weighted_sum():
    weights = dict(zip(LOSS_NAMES, (0.5, 0.25, 0.3, 1e-3, 0.1, 2.0)))
    layer = bare_layer(
        8,
        16,
        4,
        global_entropy_min_experts=(3.5, 2.0),
        scope="modality",
        **{f"{n}_weight": w for n, w in weights.items()},
    )
    x = torch.randn(10, 8)
    modality = torch.tensor([0, 1] * 5)
    _, routing = layer(x, modality)
    expected = sum(weights[k.split("/")[0]] * v for k, v in routing.aux_losses.items())
    torch.testing.assert_close(routing.aux_loss, expected)
    assert routing.aux_loss.item() > 0
    # The layer's losses, recomputed here with numpy from its router weights (loss_scope
    # "modality": every loss over each modality's tokens; no gating noise in eval mode).
    logits = (x @ layer.router.weight.t()).detach().double().numpy()
    for m, name in enumerate(("image", "text")):
        z = logits[modality.numpy() == m]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top1 = p.argmax(1)
        mean_p = p.mean(0)
        imp = p.sum(0)
        expected = {
            "importance": imp.var() / imp.mean() ** 2,
            "load": 4 * (np.bincount(top1, minlength=4) / len(z) * mean_p).sum(),
            "vmoe_load": 0.0,  # defined only with gating noise
            "z_loss": (np.log(np.exp(z).sum(1)) ** 2).mean(),
            "local_entropy": (-(p * np.log(p)).sum(1)).mean(),
            "global_entropy": max(0.0, np.log((3.5, 2.0)[m]) + (mean_p * np.log(mean_p)).sum()),
        }
        for loss, value in expected.items():
            got = routing.aux_losses[f"{loss}/{name}"].item()
            assert got == pytest.approx(value, rel=1e-4, abs=1e-6), (loss, name)


def test_layer_without_modality_keys_and_zero_weights():
    layer = bare_layer(8, 16, 4)
    _, routing = layer(torch.randn(5, 8))
    assert set(routing.aux_losses) == set(LOSS_NAMES)
    assert routing.aux_loss.item() == 0.0
    assert routing.aux_loss.shape == ()
