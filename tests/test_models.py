"""The one-tower model: shapes, the padding mask, joint routing, the open_clip surface."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer

from limoe import create_model
from limoe.models import LIMoE, text_padding_mask
from limoe.models.limoe import attention_bias, token_origin
from limoe.moe import ModalityRouter, TopKRouter

SOT, EOT = 49406, 49407


def tiny(**kwargs) -> LIMoE:
    cfg = dict(embed_dim=16, image_size=16, patch_size=4, width=32, depth=2, num_heads=2,
               context_length=8, moe_layers=[1], moe=dict(num_experts=4, capacity_factor=None),
               output_dict=True)  # fmt: skip
    cfg.update(kwargs)
    torch.manual_seed(0)
    return LIMoE(**cfg).eval()


def tokens_batch() -> torch.Tensor:
    return torch.tensor(
        [
            [SOT, 320, 2442, 736, EOT, 0, 0, 0],
            [SOT, 320, EOT, 0, 0, 0, 0, 0],
            [SOT, 11, 12, 13, 14, 15, 16, EOT],
        ]
    )


def test_text_padding_mask_marks_tokens_up_to_end_of_text():
    mask = text_padding_mask(tokens_batch())
    expected = torch.tensor(
        [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]
    ).bool()
    assert torch.equal(mask, expected)


def test_forward_shapes_and_normalised_features():
    model = tiny()
    images = torch.randn(3, 3, 16, 16)
    out = model(images, tokens_batch())
    assert out["image_features"].shape == (3, 16)
    assert out["text_features"].shape == (3, 16)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["logit_scale"], torch.tensor(1 / 0.07), rtol=1e-5)
    assert out["aux_loss"].shape == ()
    # encode_* is the open_clip surface; unnormalised by default.
    assert model.encode_image(images).shape == (3, 16)
    assert torch.allclose(
        model.encode_image(images, normalize=True), F.normalize(model.encode_image(images), dim=-1)
    )


def test_tuple_output_like_open_clip_clip():
    model = tiny(output_dict=False)
    image_features, text_features, logit_scale = model(torch.randn(2, 3, 16, 16),
                                                       tokens_batch()[:2])  # fmt: skip
    assert image_features.shape == text_features.shape == (2, 16)
    assert logit_scale.ndim == 0


def test_padding_does_not_change_text_features():
    """Tokens after end-of-text are masked out of attention and of the MoE token set."""
    model = tiny()
    tokens = tokens_batch()
    noisy = tokens.clone()
    pad = ~text_padding_mask(tokens)
    noisy[pad] = torch.randint(1, 1000, (int(pad.sum()),))
    for pool in ("eot", "mean"):
        model.text_pool = pool
        assert torch.allclose(model.encode_text(tokens), model.encode_text(noisy), atol=1e-5)


def test_moe_block_routes_image_and_real_text_tokens_together():
    model = tiny()
    images, tokens = torch.randn(3, 3, 16, 16), tokens_batch()
    routing = model(images, tokens)["routing"]
    assert len(routing) == 1
    num_patches = (16 // 4) ** 2
    num_text = int(text_padding_mask(tokens).sum())  # 5 + 3 + 8
    assert num_text == 16
    # Every text position is routed (shapes known in advance); the padding is not valid, and
    # the record of the real tokens leaves it out.
    assert routing[0].modality.shape == (3 * num_patches + tokens.numel(),)
    assert routing[0].valid.tolist() == [True] * 48 + text_padding_mask(tokens).flatten().tolist()
    modality = routing[0].real().modality
    assert modality.shape == (3 * num_patches + num_text,)
    assert int((modality == 0).sum()) == 3 * num_patches
    assert int((modality == 1).sum()) == num_text
    assert set(routing[0].aux_losses) >= {"local_entropy/image", "global_entropy/text"}


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])  # DropPath is identity in eval
def test_moe_block_updates_real_text_tokens_and_leaves_padding(drop_path_rate):
    """The block's text update, against the flat token set written with boolean masks: after
    attention, the MoE layer's output added at the real tokens, nothing at the padding."""
    model = tiny(drop_path_rate=drop_path_rate)
    block = model.blocks[1]
    assert block.is_moe and (drop_path_rate == 0) == isinstance(block.drop_path, torch.nn.Identity)
    images, tokens = torch.randn(3, 3, 16, 16), tokens_batch()
    image, text = model.embed_images(images), model.embed_text(tokens)
    mask = text_padding_mask(tokens)
    bias = attention_bias(mask, text.dtype, causal=True)
    with torch.no_grad():
        _, out, _ = block(image, text, bias, token_origin(image, mask))
        image = image + block.attn(block.norm1(image))
        text = text + block.attn(block.norm1(text), attn_mask=bias)
        flat = torch.cat([block.norm2(image).flatten(0, 1), block.norm2(text)[mask]])
        modality = torch.cat([torch.zeros(48, dtype=torch.long), torch.ones(16, dtype=torch.long)])
        y, _ = block.mlp(flat, modality)
    expected = text.clone()
    expected[mask] += y[48:]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[~mask], text[~mask])


def test_image_features_do_not_depend_on_other_images_when_dropless():
    """Dropless routing is per token, so a batch's other images cannot change an image."""
    model = tiny()
    images = torch.randn(4, 3, 16, 16)
    alone = model.encode_image(images[:1])
    together = model.encode_image(images)[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_dense_arm_has_no_experts_and_gradients_reach_everything():
    model = tiny(moe_layers=[]).train()
    out = model(torch.randn(2, 3, 16, 16), tokens_batch()[:2])
    assert out["routing"] == []
    loss = (out["image_features"] * out["text_features"]).sum() + out["aux_loss"]
    loss.backward()
    assert model.blocks[1].mlp.fc1.weight.grad is not None
    moe = tiny().train()
    out = moe(torch.randn(2, 3, 16, 16), tokens_batch()[:2])
    ((out["image_features"] * out["text_features"]).sum() + out["aux_loss"]).backward()
    assert moe.blocks[1].mlp.router.weight.grad.abs().sum() > 0


def test_bad_inputs_fail_with_a_message_naming_the_problem():
    model = tiny()
    with pytest.raises(
        ValueError, match=r"images must have shape \[B, 3, 16, 16\], got \[2, 3, 32, 32\]"
    ):
        model.encode_image(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="L <= 8"):
        model.encode_text(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="2 images but 3 token rows"):
        model(torch.randn(2, 3, 16, 16), tokens_batch())
    with pytest.raises(ValueError, match="moe_layers"):
        tiny(moe_layers=[5])


def test_create_model_builds_arms_from_the_same_size_config():
    limoe = create_model("limoe", overrides=["model.depth=2", "model.moe_layers=[1]"])
    dense = create_model("dense", overrides=["model.depth=2"])
    assert isinstance(limoe, LIMoE) and isinstance(dense, LIMoE)
    assert limoe.moe_layers == [1] and dense.moe_layers == []
    assert limoe.blocks[0].attn.qkv.weight.shape == dense.blocks[0].attn.qkv.weight.shape
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ValueError, match=r"needs a _target_, got keys \['depth', 'name'\]"):
        create_model({"name": "limoe", "depth": 2})  # would otherwise come back as a dict


def test_clip_weight_init_is_open_clips_text_tower_init():
    """``weight_init=clip``: each weight drawn as open_clip's own text tower of the same width
    and depth draws its counterpart (``TextTransformer.init_parameters``), the experts as the
    dense MLP they replace."""
    width, depth = 256, 4
    model = tiny(width=width, depth=depth, num_heads=4, moe_layers=[1], weight_init="clip")
    text = TextTransformer(context_length=8, vocab_size=100, width=width, heads=4, layers=depth)
    theirs = text.transformer.resblocks[0]
    dense, moe = model.blocks[0], model.blocks[1]
    pairs = {
        "qkv": (dense.attn.qkv.weight, theirs.attn.in_proj_weight),
        "proj": (moe.attn.proj.weight, theirs.attn.out_proj.weight),
        "fc1": (dense.mlp.fc1.weight, theirs.mlp.c_fc.weight),
        "fc2": (dense.mlp.fc2.weight, theirs.mlp.c_proj.weight),
        "expert fc1": (moe.mlp.experts.w1, theirs.mlp.c_fc.weight),
        "expert fc2": (moe.mlp.experts.w2, theirs.mlp.c_proj.weight),
        "text projection": (model.text_proj.weight, text.text_projection),
    }
    for name, (ours, reference) in pairs.items():
        want = reference.detach().std().item()
        assert ours.detach().std().item() == pytest.approx(want, rel=0.06), name
    vit = tiny(width=width, depth=depth, num_heads=4, weight_init="vit")
    assert vit.blocks[0].attn.qkv.weight.std() < 0.021
    with pytest.raises(ValueError, match="weight_init must be 'vit' or 'clip', got 'xavier'"):
        tiny(weight_init="xavier")


def test_router_init_is_timms_or_vmoes_lecun_normal():
    """``router_init_std`` sets the routers' initial std (the model's own init keeps it):
    width**-0.5 (LeCun normal, as vmoe) by default (None), timm's 0.02 when asked."""
    size = dict(embed_dim=16, image_size=16, patch_size=4, width=64, depth=2, num_heads=2,
                context_length=8, vocab_size=100, moe_layers=[1])  # fmt: skip
    torch.manual_seed(0)
    timm = (
        LIMoE(**size, moe={"num_experts": 8, "router": partial(TopKRouter, init_std=0.02)})
        .blocks[1]
        .mlp
    )
    torch.manual_seed(0)
    lecun = LIMoE(**size, moe={"num_experts": 8}).blocks[1].mlp
    assert lecun.router.init_std == 64**-0.5 and timm.router.init_std == 0.02
    assert abs(float(timm.router.weight.detach().std()) - 0.02) < 0.003
    assert abs(float(lecun.router.weight.detach().std()) - 64**-0.5) < 0.015


def test_causal_attention_bias_by_hand():
    """-inf on padding keys and, with ``causal``, on every later key; a row keeps its own
    key, so no row is all -inf."""
    from limoe.models.limoe import attention_bias

    mask = torch.tensor([[True, True, False]])
    inf = float("-inf")
    plain = attention_bias(mask, torch.float32)
    assert plain.shape == (1, 1, 1, 3) and plain[0, 0, 0].tolist() == [0.0, 0.0, inf]
    causal = attention_bias(mask, torch.float32, causal=True)[0, 0]
    assert causal.tolist() == [[0.0, inf, inf], [0.0, 0.0, inf], [0.0, 0.0, inf]]


def copy_text_tower_into_open_clip(model: LIMoE):
    """open_clip's ``TextTransformer`` (CLIP's text tower) holding the one tower's weights: the
    modality embedding, the same at every position, folds into the position embedding."""
    from open_clip.transformer import TextTransformer

    width = model.token_embed.weight.shape[1]
    ref = TextTransformer(context_length=model.context_length, vocab_size=model.token_embed.num_embeddings,
                          width=width, heads=model.blocks[0].attn.num_heads, layers=len(model.blocks),
                          output_dim=model.text_proj.out_features, pool_type="argmax")  # fmt: skip
    with torch.no_grad():
        ref.token_embedding.weight.copy_(model.token_embed.weight)
        ref.positional_embedding.copy_(model.text_pos[0] + model.modality_embed[1])
        for ours, theirs in zip(model.blocks, ref.transformer.resblocks):
            pairs = [(ours.norm1, theirs.ln_1), (ours.norm2, theirs.ln_2),
                     (ours.attn.proj, theirs.attn.out_proj), (ours.mlp.fc1, theirs.mlp.c_fc),
                     (ours.mlp.fc2, theirs.mlp.c_proj)]  # fmt: skip
            for a, b in pairs:
                b.load_state_dict(a.state_dict())
            theirs.attn.in_proj_weight.copy_(ours.attn.qkv.weight)
            theirs.attn.in_proj_bias.copy_(ours.attn.qkv.bias)
        ref.ln_final.load_state_dict(model.text_norm.state_dict())
        ref.text_projection.copy_(model.text_proj.weight.T)
    return ref.eval()


def test_causal_text_equals_open_clips_text_tower_with_the_same_weights():
    """The one tower's text path with ``text_causal_mask`` and end-of-text pooling computes
    what CLIP's text tower computes (an independent implementation: nn.MultiheadAttention,
    open_clip's mask and pooling); without the mask the features differ."""
    model = tiny(moe_layers=[], text_causal_mask=True, text_pool="eot")
    with torch.no_grad():
        model.modality_embed.normal_(std=0.5)
    ref = copy_text_tower_into_open_clip(model)
    tokens = tokens_batch()
    expected = ref(tokens)
    torch.testing.assert_close(model.encode_text(tokens), expected, rtol=1e-5, atol=1e-5)
    model.text_causal_mask = False
    assert not torch.allclose(model.encode_text(tokens), expected, atol=1e-3)


def test_image_path_equals_timms_vision_transformer_with_the_same_weights():
    """The one tower's image path (no MoE layer: each block a pre-norm attention and MLP,
    mean pooling after the final norm) computes what timm's ``VisionTransformer`` computes
    with the same weights: an independent implementation of the blocks, position embedding
    and pooling. The modality embedding, the same for every patch, folds into timm's
    position embedding."""
    from timm.models.vision_transformer import VisionTransformer

    model = tiny(moe_layers=[], image_pos_embed="learned")
    with torch.no_grad():
        for p in (model.image_pos, model.modality_embed):
            p.normal_(std=0.5)
    width = model.image_proj.in_features
    ref = VisionTransformer(
        img_size=model.image_size, patch_size=model.patch_embed.patch_size[0], num_classes=0,
        embed_dim=width, depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
        mlp_ratio=model.blocks[0].mlp.fc1.out_features / width, qkv_bias=True,
        class_token=False, global_pool="avg", fc_norm=False,
    ).eval()  # fmt: skip
    with torch.no_grad():
        ref.patch_embed.load_state_dict(model.patch_embed.state_dict())
        ref.pos_embed.copy_(model.image_pos + model.modality_embed[0])
        for ours, theirs in zip(model.blocks, ref.blocks):
            for name in ("norm1", "attn", "norm2", "mlp"):
                getattr(theirs, name).load_state_dict(getattr(ours, name).state_dict())
        ref.norm.load_state_dict(model.image_norm.state_dict())
    images = torch.randn(3, 3, model.image_size, model.image_size)
    expected = model.image_proj(ref(images))
    torch.testing.assert_close(model.encode_image(images), expected, rtol=1e-5, atol=1e-5)


def test_modality_norms_give_text_its_own_layernorms():
    """With ``modality_norms`` text goes through text_norm1/text_norm2 and images through
    norm1/norm2: copying the shared norms into the text ones gives the shared model, and
    changing the text ones changes text features only (dense and MoE blocks alike)."""
    shared = tiny()
    own = tiny(modality_norms=True)
    images, tokens = torch.randn(3, 3, 16, 16), tokens_batch()
    state = {
        k: v for k, v in own.state_dict().items() if "text_norm1" not in k and "text_norm2" not in k
    }
    assert state.keys() == shared.state_dict().keys()
    own.load_state_dict({**own.state_dict(), **shared.state_dict()})
    with torch.no_grad():
        for block in own.blocks:
            block.text_norm1.load_state_dict(block.norm1.state_dict())
            block.text_norm2.load_state_dict(block.norm2.state_dict())
    before = own(images, tokens)
    torch.testing.assert_close(before["text_features"], shared(images, tokens)["text_features"])
    with torch.no_grad():
        for block in own.blocks:
            block.text_norm1.weight.mul_(1.5)
            block.text_norm2.bias.add_(0.3)
    after = own(images, tokens)
    torch.testing.assert_close(after["image_features"], before["image_features"])
    assert not torch.allclose(after["text_features"], before["text_features"], atol=1e-3)


@pytest.mark.parametrize("moe_layers", [[1], [0, 1]])
def test_multiway_tower_is_a_dense_mlp_per_modality(moe_layers):
    """model=multiway: in its MoE blocks an image MLP and a text MLP. Copying the dense
    tower's MLP into the image expert only leaves image features equal to the dense tower's
    and text features different; copying it into both gives the dense tower exactly."""
    dense = tiny(moe_layers=[])
    multiway = tiny(moe_layers=moe_layers, moe=dict(router=ModalityRouter, num_experts=2))
    images, tokens = torch.randn(3, 3, 16, 16), tokens_batch()
    weights = multiway.state_dict()
    weights.update({k: v for k, v in dense.state_dict().items() if k in weights})
    multiway.load_state_dict(weights)

    def copy_mlp(experts: list[int]) -> None:
        with torch.no_grad():
            for i in moe_layers:
                ex, mlp = multiway.blocks[i].mlp.experts, dense.blocks[i].mlp
                for e in experts:
                    ex.w1[e].copy_(mlp.fc1.weight.T), ex.b1[e].copy_(mlp.fc1.bias)
                    ex.w2[e].copy_(mlp.fc2.weight.T), ex.b2[e].copy_(mlp.fc2.bias)

    want = dense(images, tokens)
    copy_mlp([0])
    got = multiway(images, tokens)
    torch.testing.assert_close(got["image_features"], want["image_features"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got["text_features"], want["text_features"], atol=1e-3)
    copy_mlp([1])
    got = multiway(images, tokens)
    torch.testing.assert_close(got["text_features"], want["text_features"], rtol=1e-5, atol=1e-5)
    assert [r.router for r in got["routing"]] == ["modality"] * len(moe_layers)


def test_modality_attention_gives_text_its_own_attention():
    """With ``modality_attention`` text goes through ``text_attn``: copying the shared
    attention into it gives the shared model, and changing it changes text features only."""
    shared = tiny()
    own = tiny(modality_attention=True)
    images, tokens = torch.randn(3, 3, 16, 16), tokens_batch()
    extra = {k for k in own.state_dict() if ".text_attn." in k}
    assert own.state_dict().keys() - extra == shared.state_dict().keys()
    own.load_state_dict({**own.state_dict(), **shared.state_dict()})
    with torch.no_grad():
        for block in own.blocks:
            block.text_attn.load_state_dict(block.attn.state_dict())
    before = own(images, tokens)
    torch.testing.assert_close(before["text_features"], shared(images, tokens)["text_features"])
    with torch.no_grad():
        for block in own.blocks:
            block.text_attn.qkv.weight.mul_(1.5)
    after = own(images, tokens)
    torch.testing.assert_close(after["image_features"], before["image_features"])
    assert not torch.allclose(after["text_features"], before["text_features"], atol=1e-3)


def test_shared_expert_runs_beside_the_routed_experts():
    """``shared_expert_ratio``: a dense MLP every token of the MoE block runs. With the routed
    experts' outputs zeroed, the block is the dense tower whose MLP is the shared one; with
    copies of it as experts and renormalised gates, it adds the dense MLP twice."""
    dense = tiny(moe_layers=[])
    router = partial(TopKRouter, renormalize_gates=True)
    shared = tiny(moe=dict(num_experts=4, router=router, shared_expert_ratio=4.0))
    assert shared.blocks[1].mlp.shared_expert.fc1.weight.shape == (128, 32)
    images, tokens = torch.randn(3, 3, 16, 16), tokens_batch()
    weights = shared.state_dict()
    weights.update({k: v for k, v in dense.state_dict().items() if k in weights})
    weights.update({k.replace(".mlp.", ".mlp.shared_expert."): v
                    for k, v in dense.state_dict().items() if k.startswith("blocks.1.mlp.")})  # fmt: skip
    shared.load_state_dict(weights)
    experts = shared.blocks[1].mlp.experts
    with torch.no_grad():
        experts.w2.zero_(), experts.b2.zero_()
    want, got = dense(images, tokens), shared(images, tokens)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    # Every expert a copy of the dense MLP (top-1, renormalised gate 1): the MLP update doubles,
    # the same as a dense tower whose second MLP has its output layer doubled.
    mlp = dense.blocks[1].mlp
    with torch.no_grad():
        for e in range(4):
            experts.w1[e].copy_(mlp.fc1.weight.T), experts.b1[e].copy_(mlp.fc1.bias)
            experts.w2[e].copy_(mlp.fc2.weight.T), experts.b2[e].copy_(mlp.fc2.bias)
        mlp.fc2.weight.mul_(2), mlp.fc2.bias.mul_(2)
    want, got = dense(images, tokens), shared(images, tokens)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_fine_grained_experts_keep_the_dense_flops():
    """``expert_mlp_ratio``: experts of hidden width ratio * width; 4 experts of half the
    dense MLP's width, top-2, cost what full-width experts cost at top-1 (same router)."""
    from limoe.models.cost import flops_per_pair

    fine = tiny(moe=dict(num_experts=8, router=partial(TopKRouter, top_k=2), expert_mlp_ratio=2.0))
    assert fine.blocks[1].mlp.experts.w1.shape == (8, 32, 64)
    images, tokens = torch.randn(3, 3, 16, 16), tokens_batch()
    base = flops_per_pair(tiny(moe=dict(num_experts=8)), images, tokens)
    assert flops_per_pair(fine, images, tokens) == pytest.approx(base, rel=1e-6)
    with pytest.raises(ValueError, match=r"model\.moe\.expert_mlp_ratio=0\.0 gives an MLP"):
        tiny(moe=dict(num_experts=8, expert_mlp_ratio=0.0))
