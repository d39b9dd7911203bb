"""The one-tower LIMoE encoder: image patches and text tokens share every block.

Attention runs per modality (each has its own sequence length and, for text, a padding mask
and by default CLIP's causal mask); the MLP sees the tokens of both modalities as one flat
set, so in MoE blocks image and text tokens compete for the same experts, capacity and Batch
Priority Routing. With ``moe_layers=[]`` the same class is the dense one-tower baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent, DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import Tensor, nn

from limoe.moe import Experts, MoELayer, Router, Routing, TokenOrigin, TopKRouter

IMAGE, TEXT = 0, 1  # modality ids given to the MoE layers (MODALITY_NAMES' order)


def text_padding_mask(tokens: Tensor) -> Tensor:
    """True for real tokens (start .. end-of-text), False for padding.

    The end-of-text token has the largest id of open_clip's vocabulary, so ``argmax`` finds it
    (as open_clip's text pooling does); padding id 0 is also a real word, so it cannot be used.
    """
    eot = tokens.argmax(dim=-1, keepdim=True)
    return torch.arange(tokens.shape[-1], device=tokens.device) <= eot


def attention_bias(text_mask: Tensor, dtype: torch.dtype, causal: bool = False) -> Tensor:
    """Additive attention mask: -inf on padding keys, so no query attends to them ([B, 1, 1,
    L]); with ``causal`` also -inf above the diagonal, so a token sees only itself and the
    tokens before it, as CLIP's text tower ([B, 1, L, L]). Every row keeps at least one key.
    Works for the fused and the plain attention paths of timm's ``Attention``."""
    bias = torch.zeros(text_mask.shape, dtype=dtype, device=text_mask.device)
    bias = bias.masked_fill(~text_mask, float("-inf"))[:, None, None, :]
    if causal:
        length = text_mask.shape[-1]
        future = torch.full((length, length), float("-inf"), dtype=dtype, device=bias.device)
        bias = bias + future.triu(1)
    return bias


def moe_mlp(
    dim: int,
    mlp_ratio: float,
    num_experts: int = 16,
    router: Callable[[int, int], Router] = TopKRouter,
    experts: Callable[..., Experts] = Experts,
    expert_mlp_ratio: float | None = None,
    shared_expert_ratio: float = 0.0,
    **layer,
) -> MoELayer:
    """A block's sparse MLP from the config's ``model.moe`` node: ``router(dim, num_experts)``
    and ``experts(num_experts, dim, hidden)`` (the ``router`` and ``experts`` nodes, Hydra
    partials), the losses and the rest of ``layer`` as ``MoELayer`` takes them.

    ``expert_mlp_ratio`` is each expert's hidden width over ``dim`` (None: ``mlp_ratio``), for
    fine-grained experts (DeepSeekMoE: more, narrower experts, several per token, at the same
    FLOPs); ``shared_expert_ratio`` the hidden width over ``dim`` of a dense timm ``Mlp`` every
    token runs beside its routed experts (DeepSeekMoE's shared expert; 0: none)."""
    ratio = mlp_ratio if expert_mlp_ratio is None else expert_mlp_ratio
    hidden = _hidden_width(dim, ratio, "model.moe.expert_mlp_ratio")
    shared = None
    if shared_expert_ratio:
        shared = Mlp(dim, _hidden_width(dim, shared_expert_ratio, "model.moe.shared_expert_ratio"))
    return MoELayer(
        router(dim, num_experts), experts(num_experts, dim, hidden), shared_expert=shared, **layer
    )


class Block(nn.Module):
    """Pre-LN transformer block; the MLP is a dense timm ``Mlp`` or a sparse ``MoELayer``
    (``moe``: the config's ``model.moe`` node, see ``moe_mlp``). Both MLPs take the image and
    text tokens as one flat set, so the block has one path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        moe: dict | None = None,
        modality_norms: bool = False,
        modality_attention: bool = False,
    ) -> None:
        super().__init__()
        # norm1/norm2 and attn serve both modalities, or with modality_norms /
        # modality_attention the image tokens only and text_norm1/text_norm2 / text_attn the
        # text tokens (as each of CLIP's towers has its own).
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.text_norm1 = nn.LayerNorm(dim) if modality_norms else None
        self.text_norm2 = nn.LayerNorm(dim) if modality_norms else None
        self.text_attn = None
        if modality_attention:
            self.text_attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if moe is None else moe_mlp(dim, mlp_ratio, **moe)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def forward(
        self,
        image: Tensor | None,
        text: Tensor | None,
        text_bias: Tensor | None,
        origin: TokenOrigin | None,
    ) -> tuple[Tensor | None, Tensor | None, Routing | None]:
        """``text_bias`` is the text's ``attention_bias`` and ``origin`` where each token of
        the MLP came from (``token_origin``; None in a tower without MoE blocks); the tower
        builds both once for all blocks. Image patches and every text position go through the
        MLP as one flat token set, images first: in a MoE block they compete for the same
        experts, capacity and Batch Priority Routing. The text padding is routed too
        (``origin.valid`` False): it takes no expert, capacity, loss or statistic, and every
        shape is known before the call, so nothing waits on the device to count real tokens."""
        text_norm1, text_norm2 = (
            (self.norm1, self.norm2) if self.text_norm1 is None else
            (self.text_norm1, self.text_norm2)
        )  # fmt: skip
        text_attn = self.attn if self.text_attn is None else self.text_attn
        parts = []
        if image is not None:
            image = image + self.drop_path(self.attn(self.norm1(image)))
            parts.append(self.norm2(image).flatten(0, 1))
        if text is not None:
            text = text + self.drop_path(text_attn(text_norm1(text), attn_mask=text_bias))
            parts.append(text_norm2(text).flatten(0, 1))
        tokens = torch.cat(parts) if len(parts) > 1 else parts[0]
        y, routing = self.mlp(tokens, *origin) if self.is_moe else (self.mlp(tokens), None)
        outs = iter(y.split([p.shape[0] for p in parts]))
        if image is not None:
            image = image + self.drop_path(next(outs).to(image.dtype).view_as(image))
        if text is not None:
            text = text + self.drop_path(next(outs).to(text.dtype).view_as(text))
        return image, text, routing


def _hidden_width(dim: int, ratio: float, key: str) -> int:
    hidden = int(dim * ratio)
    if ratio <= 0 or hidden < 1:
        raise ValueError(f"{key}={ratio} gives an MLP of hidden width {hidden}; it needs > 0")
    return hidden


def token_origin(image: Tensor | None, text_mask: Tensor | None) -> TokenOrigin:
    """Where each token an MoE block routes came from, in the order ``Block.forward``
    concatenates them: every image's patches (pair-major, patch order), then every text
    position (pair-major, position order), with ``valid`` False at the text padding (None
    without text: every token is real). The sequence is the pair's index in the batch. Built
    from shapes alone, with no host read."""
    modality, sequence, position, valid = [], [], [], []
    for states, kind in ((image, IMAGE), (text_mask, TEXT)):
        if states is None:
            continue
        batch, length = states.shape[:2]
        flat = torch.arange(batch * length, device=states.device)
        sequence.append(torch.div(flat, length, rounding_mode="floor"))
        position.append(flat % length)
        modality.append(torch.full_like(flat, kind))
        real = text_mask.flatten() if kind == TEXT else torch.ones_like(flat, dtype=torch.bool)
        valid.append(real)
    origin = [torch.cat(parts) if len(parts) > 1 else parts[0]
              for parts in (modality, sequence, position, valid)]  # fmt: skip
    return TokenOrigin(*origin[:3], origin[3] if text_mask is not None else None)


# The options of LIMoE's string-valued arguments.
CHOICES = {
    "image_pos_embed": ("learned", "sincos"),
    "image_pool": ("attn", "mean"),
    "text_pool": ("eot", "mean"),
    "weight_init": ("vit", "clip"),
}


class LIMoE(nn.Module):
    """One transformer tower for images and text with the open_clip model surface.

    ``encode_image``, ``encode_text``, ``logit_scale`` and ``forward(images, tokens)`` behave
    as in open_clip's ``CLIP``, so open_clip-style evaluation code runs on this model.
    ``forward`` with ``output_dict=True`` also returns the routing records of the MoE blocks
    and ``aux_loss``, the weighted sum of their auxiliary losses.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        image_size: int = 56,
        patch_size: int = 8,
        in_chans: int = 3,
        width: int = 96,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        context_length: int = 16,
        vocab_size: int = 49408,
        moe_layers: Sequence[int] = (0, 1, 2, 3),
        moe: dict | None = None,
        image_pos_embed: str = "sincos",
        image_pool: str = "mean",
        text_pool: str = "eot",
        text_causal_mask: bool = True,
        modality_norms: bool = False,
        modality_attention: bool = False,
        drop_path_rate: float = 0.0,
        weight_init: str = "clip",
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = None,
        output_dict: bool = True,
    ) -> None:
        super().__init__()
        moe_layers = sorted(int(i) for i in moe_layers)
        if any(not 0 <= i < depth for i in moe_layers):
            raise ValueError(f"moe_layers must be block indices in [0, {depth}), got {moe_layers}")
        given = {"image_pos_embed": image_pos_embed, "image_pool": image_pool,
                 "text_pool": text_pool, "weight_init": weight_init}  # fmt: skip
        for name, value in given.items():
            if value not in CHOICES[name]:
                raise ValueError(f"{name} must be {' or '.join(map(repr, CHOICES[name]))}, "
                                 f"got {value!r}")  # fmt: skip
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        self.image_size, self.context_length = image_size, context_length
        self.moe_layers, self.output_dict = moe_layers, output_dict
        self.image_pool, self.text_pool = image_pool, text_pool
        self.text_causal_mask = bool(text_causal_mask)

        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, width)
        self.image_pos = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, width))
        if image_pos_embed == "sincos":  # fixed 2-D sin-cos (MAE): position is clear from step 0
            grid = list(self.patch_embed.grid_size)
            self.image_pos.data.copy_(build_sincos2d_pos_embed(grid, width).unsqueeze(0))
            self.image_pos.requires_grad_(False)
        self.token_embed = nn.Embedding(vocab_size, width)
        self.text_pos = nn.Parameter(torch.zeros(1, context_length, width))
        self.modality_embed = nn.Parameter(torch.zeros(2, width))

        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, drop_path=drop_path[i],
                  moe=(moe or {}) if i in moe_layers else None,
                  modality_norms=modality_norms, modality_attention=modality_attention)
            for i in range(depth)
        )  # fmt: skip
        self.image_norm = nn.LayerNorm(width)
        self.text_norm = nn.LayerNorm(width)
        if image_pool == "attn":
            self.image_attn_pool = AttentionPoolLatent(
                width, num_heads=num_heads, mlp_ratio=mlp_ratio
            )
        self.image_proj = nn.Linear(width, embed_dim, bias=False)
        self.text_proj = nn.Linear(width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        # SigLIP's learned bias of the pair logits (open_clip's CLIP has the same); None: CLIP's
        # softmax loss, which needs none.
        self.logit_bias = None
        if init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.init_weights(weight_init)

    def moe_layer(self, index: int) -> MoELayer:
        """The ``MoELayer`` of block ``index`` (one of ``moe_layers``)."""
        return self.blocks[index].mlp

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid (rows, columns), as the routing analyses read it."""
        return tuple(self.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def init_weights(self, mode: str = "clip") -> None:
        """The model's one initialisation. timm's ViT init first: trunc normal of std 0.02 for
        the embeddings, positions and every ``nn.Linear`` (zero biases), each router with its own std
        (``model.moe.router.init_std``). Then, for ``clip``, open_clip's
        text-tower init of the shared tower: stds that shrink with width (and depth, for the
        residual projections) instead of timm's fixed 0.02, which at width 96 leaves the tower
        learning several times more slowly; experts are drawn as the dense MLP they replace."""
        for p in (self.image_pos, self.text_pos, self.modality_embed):
            if p.requires_grad:
                trunc_normal_(p, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, TopKRouter):  # its own std (model.moe.router.init_std)
                trunc_normal_(m.weight, std=m.init_std)
            elif isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if mode == "clip":
            self._init_clip_stds()

    def _init_clip_stds(self) -> None:
        width, depth = self.token_embed.embedding_dim, len(self.blocks)
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * depth) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.blocks:
            for attn in filter(None, (block.attn, block.text_attn)):
                nn.init.normal_(attn.qkv.weight, std=attn_std)
                nn.init.normal_(attn.proj.weight, std=proj_std)
            if not block.is_moe:
                nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
                nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
                continue
            block.mlp.experts.reset_parameters(fc_std, proj_std, truncated=False)
            if block.mlp.shared_expert is not None:
                nn.init.normal_(block.mlp.shared_expert.fc1.weight, std=fc_std)
                nn.init.normal_(block.mlp.shared_expert.fc2.weight, std=proj_std)
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=width**-0.5)

    def _check_images(self, images: Tensor) -> None:
        want = (self.patch_embed.proj.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images must have shape [B, {', '.join(map(str, want))}], "
                             f"got {list(images.shape)}")  # fmt: skip

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens must have shape [B, L] with L <= {self.context_length}, "
                             f"got {list(tokens.shape)}")  # fmt: skip

    def embed_images(self, images: Tensor) -> Tensor:
        self._check_images(images)
        return self.patch_embed(images) + self.image_pos + self.modality_embed[IMAGE]

    def embed_text(self, tokens: Tensor) -> Tensor:
        self._check_tokens(tokens)
        pos = self.text_pos[:, : tokens.shape[1]]
        return self.token_embed(tokens) + pos + self.modality_embed[TEXT]

    def tower(
        self, images: Tensor | None, tokens: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, list[Routing]]:
        """Run the shared blocks; returns the unpooled image and text states and routing."""
        image = None if images is None else self.embed_images(images)
        text = None if tokens is None else self.embed_text(tokens)
        text_mask = None if tokens is None else text_padding_mask(tokens)
        text_bias = None
        if text is not None:
            text_bias = attention_bias(text_mask, text.dtype, self.text_causal_mask)
        origin = token_origin(image, text_mask) if self.moe_layers else None
        routings = []
        for block in self.blocks:
            image, text, routing = block(image, text, text_bias, origin)
            if routing is not None:
                routings.append(routing)
        return image, text, routings

    def pool_image(self, image: Tensor) -> Tensor:
        image = self.image_norm(image)
        pooled = self.image_attn_pool(image) if self.image_pool == "attn" else image.mean(1)
        return self.image_proj(pooled)

    def pool_text(self, text: Tensor, tokens: Tensor) -> Tensor:
        text = self.text_norm(text)
        if self.text_pool == "eot":
            pooled = text[torch.arange(text.shape[0], device=text.device), tokens.argmax(-1)]
        else:
            mask = text_padding_mask(tokens).unsqueeze(-1).to(text.dtype)
            pooled = (text * mask).sum(1) / mask.sum(1)
        return self.text_proj(pooled)

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        image, _, _ = self.tower(images, None)
        features = self.pool_image(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        _, text, _ = self.tower(None, tokens)
        features = self.pool_text(text, tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: Tensor, tokens: Tensor) -> dict | tuple:
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {tokens.shape[0]} token rows")
        image, text, routings = self.tower(images, tokens)
        image_features = F.normalize(self.pool_image(image), dim=-1)
        text_features = F.normalize(self.pool_text(text, tokens), dim=-1)
        logit_scale = self.logit_scale.exp()
        if not self.output_dict:
            out = image_features, text_features, logit_scale
            return out if self.logit_bias is None else (*out, self.logit_bias)
        aux_loss = sum((r.aux_loss for r in routings), image_features.new_zeros(()))
        out = {
            "image_features": image_features,
            "text_features": text_features,
            "logit_scale": logit_scale,
            "aux_loss": aux_loss,
            "routing": routings,
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
