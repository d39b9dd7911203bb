"""One source of defaults: every constructor default of what the configs build equals the
composed YAML, and every YAML key is a constructor argument, so ``LIMoE()`` is the model
``create_model("limoe")`` builds and ``ScenesDataModule()`` the data ``limoe-train`` trains on."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import pytest
from omegaconf import OmegaConf
from open_clip.loss import ClipLoss, SigLipLoss

from limoe.data import ImageTextDataModule, ScenesDataModule, ShapesDataModule
from limoe.factory import create_model
from limoe.lit import RoutingHistory
from limoe.models import LIMoE, build_clip
from limoe.models.limoe import Block, moe_mlp
from limoe.moe import (
    ExpertChoiceRouter,
    Experts,
    MoELayer,
    RouterLosses,
    SoftRouter,
    TopKRouter,
)
from limoe.train import compose

# (what is built, the config node, the overrides that select it, arguments set elsewhere)
BUILT = [
    (LIMoE, "model", [], {"moe"}),  # moe: the MoE layer's own defaults, checked below
    # model.moe holds moe_mlp's arguments and, passed on, MoELayer's (test below)
    (moe_mlp, "model.moe", [], {"dim", "mlp_ratio", "router", "experts"}),
    (MoELayer, "model.moe", [], {"router", "experts", "losses", "shared_expert"}),
    (TopKRouter, "model.moe.router", [], {"dim", "num_experts"}),
    (ExpertChoiceRouter, "model.moe.router", ["router@model.moe.router=expert_choice"],
     {"dim", "num_experts", "batch_priority", "renormalize_gates", "score", "balance",
      "bias_step", "bias_per_modality"}),  # read by top-k only
    (SoftRouter, "model.moe.router", ["router@model.moe.router=soft"],
     {"dim", "num_experts", "eps"}),  # eps: a numerical guard, not a knob
    (Experts, "model.moe.experts", [], {"num_experts", "dim", "hidden_dim", "act_layer"}),
    (RouterLosses, "model.moe.losses", [], {"modality_names"}),
    (
        Block,
        "model",
        [],
        {
            "dim",
            "num_heads",
            "mlp_ratio",
            "qkv_bias",
            "drop_path",
            "moe",
            "modality_norms",
            "modality_attention",
        },
    ),  # fmt: skip
    (build_clip, "model", ["model=clip"], set()),
    # model=clip with experts: its moe_layers and the moe node (model=limoe's) set apart
    (build_clip, "model", ["model=clip_moe"], {"moe", "moe_layers"}),
    # open_clip's losses: rank, world size and gathering follow the process layout
    # (build_loss); cache_labels is set as open_clip's training sets it, not as its default.
    (ClipLoss, "loss", [], {"local_loss", "gather_with_grad", "rank", "world_size",
                            "use_horovod", "cache_labels"}),
    (SigLipLoss, "loss", ["loss=siglip"], {"rank", "world_size"}),
    (ShapesDataModule, "data", ["data=shapes"], set()),
    (ScenesDataModule, "data", ["data=scenes"], set()),
    (ImageTextDataModule, "data", ["data=csv"], set()),
    (RoutingHistory, "callbacks.routing_history", [], {"dirpath"}),
]  # fmt: skip
# upcycle_from and compile: read by the builders (limoe.factory), never passed to the model.
NOT_ARGUMENTS = {"_target_", "_convert_", "_partial_", "upcycle_from", "compile"}


def plain(value):
    """Tuples as lists and mappings as dicts, so a default compares with its YAML value."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


@pytest.mark.parametrize(
    ("built", "node", "overrides", "elsewhere"), BUILT, ids=[b[0].__name__ for b in BUILT]
)
def test_constructor_defaults_are_the_yaml(built, node, overrides, elsewhere, tmp_path):
    cfg = compose(overrides, output_dir=tmp_path)
    values = OmegaConf.to_container(OmegaConf.select(cfg, node), resolve=True)
    params = inspect.signature(built).parameters
    if built in (moe_mlp, MoELayer, Block):  # each reads its own part of the node
        values = {k: v for k, v in values.items() if k in params}
    assert set(values) - NOT_ARGUMENTS <= set(params), "a YAML key the constructor does not take"
    for name, param in params.items():
        if name in elsewhere or param.default is inspect.Parameter.empty:
            continue
        assert name in values, f"{node}.{name} is missing: name every knob in the config"
        assert plain(param.default) == plain(values[name]), f"{node}.{name}"


def test_every_key_of_the_moe_node_is_read(tmp_path):
    moe = compose([], output_dir=tmp_path).model.moe
    taken = inspect.signature(moe_mlp).parameters.keys() | inspect.signature(MoELayer).parameters
    assert set(moe) <= set(taken)


def test_limoe_with_no_arguments_is_the_default_model():
    import torch

    torch.manual_seed(0)
    built = create_model("limoe")
    torch.manual_seed(0)
    bare = LIMoE()
    assert repr(bare) == repr(built)
    for (name, a), (_, b) in zip(bare.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b), name
