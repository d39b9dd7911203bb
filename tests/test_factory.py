"""open_clip-style loading: ``limoe-export`` of a trained checkpoint, and
``create_model_and_transforms`` / ``get_tokenizer`` from a name, a checkpoint or an export,
checked against Lightning's own loading and the datamodule's own transforms."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

import limoe
from limoe import cli
from limoe.checkpoint import model_weights
from limoe.data.preprocess import Preprocess
from limoe.factory import build_model, export_model
from limoe.lit import ContrastiveModule
from limoe.train import build_datamodule, compose, plain, train

RUN = ["experiment=smoke", "data.train_size=64", "data.batch_size=16", "trainer.max_steps=2",
       "test=false", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    """A two-step run's ``last.ckpt`` and its composed config."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(RUN, run_dir)
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt", cfg


def _features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def _rgba_image(seed: int = 0, size: int = 40) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA")


def test_export_loads_back_with_the_checkpoints_features_transforms_and_tokenizer(
    trained, tmp_path
):
    ckpt, cfg = trained
    out = export_model(ckpt, tmp_path / "export")
    reference = ContrastiveModule.load_from_checkpoint(ckpt, map_location="cpu").model.eval()
    # Weights only: exactly the model's tensors, no optimiser state or Lightning keys.
    assert set(load_file(out / "model.safetensors")) == set(reference.state_dict())
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["_target_"] == "limoe.models.LIMoE"
    datamodule = build_datamodule(cfg)
    image = _rgba_image()
    texts = ["a red circle in the centre", "a blue square"]
    expected = _features(reference, datamodule._eval_transform()(image.convert("RGB"))[None],
                         datamodule.tokenizer(texts))  # fmt: skip
    for source in (out, ckpt):
        model, _, preprocess_val = limoe.create_model_and_transforms(source)
        tokenizer = limoe.get_tokenizer(source)
        assert not model.training and tokenizer.context_length == cfg.data.context_length
        # The datamodule composites transparency on white before its transform.
        images = preprocess_val(image)[None]
        white = Image.alpha_composite(Image.new("RGBA", image.size, (255,) * 4), image)
        reference_images = datamodule._eval_transform()(white.convert("RGB"))[None]
        torch.testing.assert_close(images, reference_images, rtol=0, atol=0)
        got = _features(model, datamodule._eval_transform()(image.convert("RGB"))[None],
                        tokenizer(texts))  # fmt: skip
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_name_gives_random_weights_with_that_configs_preprocessing():
    model, preprocess_train, preprocess_val = limoe.create_model_and_transforms("dense")
    assert type(model).__name__ == "LIMoE" and not any(b.is_moe for b in model.blocks)
    assert preprocess_val(_rgba_image(size=80)).shape == (3, 56, 56)  # scenes: 56 px
    assert preprocess_train(_rgba_image(size=80)).shape == (3, 56, 56)
    assert limoe.get_tokenizer("clip").context_length == 16
    assert limoe.get_tokenizer("limoe", ["data=shapes"]).context_length == 24


def test_limoe_export_console_entry(trained, tmp_path, console):
    ckpt, _ = trained
    code, out, err = console(cli.export, [f"ckpt={ckpt}", f"out={tmp_path / 'e'}"], tmp_path)
    assert code == 0, err
    assert f"wrote {tmp_path / 'e' / 'model.safetensors'}" in out


def test_bad_sources_fail_with_one_line_naming_them(tmp_path, console):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/model.safetensors").write_bytes(b"")
    (tmp_path / "bad/config.json").write_text('{"model": {}}')
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    cases = {
        tmp_path
        / "nope": "model config (clip, clip_b16, clip_b32, clip_l14, clip_moe, dense, dense_b16, dense_b32, "
        "dense_l16, limoe, limoe_b16, limoe_b32, limoe_bias, limoe_bias_only, limoe_l16, multiway) nor an",
        tmp_path / "empty": "is not a limoe export: it needs model.safetensors and config.json",
        tmp_path / "bad": "config.json is not a limoe export config",
        tmp_path / "notes.ckpt": "is not a limoe checkpoint",
    }
    for source, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            limoe.create_model_and_transforms(source)
    argv = [f"ckpt={tmp_path / 'nope.ckpt'}", f"out={tmp_path / 'e'}"]
    code, _, err = console(cli.export, argv, tmp_path)
    assert (
        code == 2 and err.strip() == f"limoe: error: ckpt={tmp_path / 'nope.ckpt'} does not exist"
    )


@pytest.mark.parametrize(
    "overrides",
    [[], ["data=shapes"], ["data=csv"],
     ["data=csv", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
      "+data.augment.scale=[0.5,1.0]", "data.background=[0,0,0]"]],
    ids=["scenes", "shapes", "csv", "csv_own"],
)  # fmt: skip
def test_preprocess_of_a_data_config_is_what_its_datamodule_applies(overrides, tmp_path):
    """Read off the config and the datamodule's class, without building the datamodule: the
    same size, normalisation, augmentation, background and context length as the built one."""
    cfg = compose(overrides, tmp_path)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    preprocess = Preprocess.of_data(data)
    datamodule = instantiate(cfg.data)
    assert preprocess.image_size == datamodule.image_size
    assert preprocess.context_length == datamodule.context_length
    assert preprocess.mean == tuple(datamodule.mean) and preprocess.std == tuple(datamodule.std)
    assert preprocess.background == tuple(datamodule.background)
    assert preprocess.augment == getattr(datamodule, "augment", {})
    assert Preprocess.from_dict(preprocess.as_dict()) == preprocess


def test_model_compile_compiles_in_place_and_keeps_the_state_dict_keys():
    """``model.compile=true``: the forward is compiled (``nn.Module.compile``) and the weights
    keep their names, so checkpoints load either way."""
    cfg = plain(compose(["experiment=smoke"]).model)
    eager = build_model({**cfg, "compile": False})
    compiled = build_model({**cfg, "compile": True})
    assert eager._compiled_call_impl is None and compiled._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())


# A model.moe node as checkpoints and exports of earlier versions stored it: every option flat,
# the router by name (here Soft MoE, with options of every part set away from the defaults).
FLAT_MOE = {
    "router": "soft", "slots_per_expert": 2, "num_experts": 4, "top_k": 1,
    "capacity_factor": None, "eval_capacity_factor": None, "batch_priority": True,
    "renormalize_gates": False, "noisy_gating": True, "capacity_multiple": 4,
    "router_init_std": None, "drop": 0.1, "expert_mlp_ratio": None,
    "shared_expert_ratio": 0.0, "dispatch": "sorted", "gemm": "loop", "expert_parallel": False,
    "importance_weight": 0.3, "load_weight": None, "vmoe_load_weight": None,
    "z_loss_weight": 0.0, "loss_scope": "modality", "local_entropy_weight": 0.02,
    "global_entropy_weight": 0.0, "global_entropy_min_experts": [2.0, 3.0],
}  # fmt: skip
NESTED = [
    "router@model.moe.router=soft", "model.moe.router.slots_per_expert=2",
    "model.moe.experts.drop=0.1", "model.moe.experts.gemm=loop",
    "model.moe.losses.importance_weight=0.3", "model.moe.losses.scope=modality",
    "model.moe.losses.local_entropy_weight=0.02", "model.moe.losses.global_entropy_weight=0",
    "model.moe.losses.global_entropy_min_experts=[2.0,3.0]",
]  # fmt: skip


def test_a_stored_config_of_flat_moe_keys_builds_the_model_of_todays_config(tmp_path):
    """Checkpoints of earlier versions keep loading: their flat ``model.moe`` node builds the
    same model (parts, options, weights) as today's nested one."""
    cfg = plain(compose(["experiment=smoke", "size.num_experts=4", *NESTED], tmp_path).model)
    torch.manual_seed(0)
    today = build_model(cfg)
    torch.manual_seed(0)
    stored = build_model({**cfg, "moe": FLAT_MOE})
    assert repr(stored) == repr(today)
    layer = stored.blocks[0].mlp
    assert (layer.router.slots_per_expert, layer.experts.gemm, layer.losses.scope) == (
        2, "loop", "modality")  # fmt: skip
    assert layer.losses.weights["importance"] == 0.3
    assert layer.losses.min_experts == (2.0, 3.0)
    for (name, a), (_, b) in zip(stored.state_dict().items(), today.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_checkpoint_from_before_the_shared_expert_moved_loads(tmp_path):
    """Earlier versions kept a block's shared expert beside its MoE layer (``shared_mlp``);
    their weights load into the layer's ``shared_expert``."""
    cfg = plain(compose(["experiment=smoke", "model.moe.shared_expert_ratio=1.0"], tmp_path).model)
    model = build_model(cfg)
    then = {f"model.{k}".replace(".mlp.shared_expert.", ".shared_mlp."): v
            for k, v in model.state_dict().items()}  # fmt: skip
    assert "model.blocks.0.shared_mlp.fc1.weight" in then
    fresh = build_model(cfg, model_weights({"state_dict": then}))
    for (name, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
