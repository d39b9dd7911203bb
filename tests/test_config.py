"""One source of defaults: every constructor default of what the configs build equals the
composed YAML, and every YAML key is a constructor argument, so ``LIMoE()`` is the model
``create_model("limoe")`` builds and ``ScenesDataModule()`` the data ``limoe-train`` trains on."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import pytest
from omegaconf import OmegaConf

from limoe.data import ImageTextDataModule, ScenesDataModule, ShapesDataModule
from limoe.lit import RoutingHistory
from limoe.models import LIMoE, build_clip, create_model
from limoe.models.limoe import BLOCK_MOE_KEYS, Block
from limoe.moe import MoELayer
from limoe.train import compose

# (what is built, the config node, the overrides that select it, arguments set elsewhere)
BUILT = [
    (LIMoE, "model", [], {"moe"}),  # moe: MoELayer's own defaults, checked below
    (MoELayer, "model.moe", [], {"dim", "hidden_dim", "modality_names", "act_layer"}),
    (
        Block,
        "model.moe",
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
    (ShapesDataModule, "data", ["data=shapes"], set()),
    (ScenesDataModule, "data", ["data=scenes"], set()),
    (ImageTextDataModule, "data", ["data=csv"], set()),
    (RoutingHistory, "callbacks.routing_history", [], {"dirpath"}),
]
# upcycle_from and compile: read by the builders (limoe.models.build), never passed to the model.
NOT_ARGUMENTS = {"_target_", "_convert_", "upcycle_from", "compile"}


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
    if node == "model.moe":  # MoELayer's arguments and the ones the Block reads
        values = {k: v for k, v in values.items() if (k in BLOCK_MOE_KEYS) == (built is Block)}
    assert set(values) - NOT_ARGUMENTS <= set(params), "a YAML key the constructor does not take"
    for name, param in params.items():
        if name in elsewhere or param.default is inspect.Parameter.empty:
            continue
        assert name in values, f"{node}.{name} is missing: name every knob in the config"
        assert plain(param.default) == plain(values[name]), f"{node}.{name}"


def test_limoe_with_no_arguments_is_the_default_model():
    import torch

    torch.manual_seed(0)
    built = create_model("limoe")
    torch.manual_seed(0)
    bare = LIMoE()
    assert repr(bare) == repr(built)
    for (name, a), (_, b) in zip(bare.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b), name
