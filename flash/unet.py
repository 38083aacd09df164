"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL, inpainting), with diffusers' checkpoint key names.

Follows the LDM UNet (Rombach et al. 2022; Ronneberger et al. 2015 for the U shape, Ho et al. 2020 for the
ResNet + timestep design) and SDXL (Podell et al. 2023: per-level transformer depth, no attention at the
highest resolution, "text_time" micro-conditioning), as laid out by diffusers' `UNet2DConditionModel`: the
module tree equals the keys of a diffusers `unet/` folder, so weights load with no renaming.

    t -> sinusoidal (fp32) -> time_embedding [+ add_embedding(pooled text, size/crop ids)]  = emb
    x -> conv_in -> down levels [ResNet(emb), Transformer(context)] x n, downsample  (each output kept as a skip)
      -> mid (ResNet, Transformer, ResNet)
      -> up levels [concat skip, ResNet(emb), Transformer(context)] x (n+1), upsample
      -> GroupNorm+SiLU -> conv_out  = eps (or v) prediction

Image conditions (flash's tasks beyond text-to-image, docs/method.md):
- `concat`: extra input channels concatenated to the noisy latent before conv_in, as SD's inpainting UNets
  (mask 1 + masked-image latent 4, in_channels 9) and the latent super-resolution model (low-res latent 4).
- `adapter_residuals`: a T2I-Adapter's multi-scale features (flash/adapter.py), added where diffusers'
  `down_intrablock_additional_residuals` adds them: one per down level, to the output of the level's last
  (ResNet, Transformer) pair before its downsampler, or, for a level without attention, to the level's
  output after the downsampler (an in-place add in diffusers, so that level's last skip carries it too); a
  feature left over whose shape equals the mid-block output is added there (T2I-Adapter-XL).

Deviations: only the configurations released for SD1.x/2.x/XL are supported (others raise a ValueError
naming the field); attention masks, ControlNet residuals, class labels and GLIGEN are not.
`upcast_attention` is accepted and always honoured: the attention kernel keeps softmax statistics in fp32.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from flash.config_check import checked_kwargs
from flash.io import read_json
from flash.layers import (Attention, Downsample2D, FeedForward, GroupNorm, LayerNorm, ResnetBlock2D,
                          TimestepEmbedding, Upsample2D, timestep_embedding)


def image_to_tokens(x):
    """(B, C, H, W) -> (B, H*W, C), row-major over the pixels."""
    return rearrange(x, "b c h w -> b (h w) c")


def tokens_to_image(tokens, h, w):
    """(B, H*W, C) -> (B, C, H, W), copied to NCHW as diffusers does (layout matters: flash/layers.py)."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w).contiguous()


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward, each with a residual.

    Residuals are f(x) + x (see flash/layers.py): after a 1x1-conv proj_in the first block's input is a
    transposed view of the image, and x + f(x) would carry that layout through every block.
    """

    def __init__(self, dim, *, heads, context_dim):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, head_dim=dim // heads)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads=heads, head_dim=dim // heads, context_dim=context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim, activation="geglu")

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> `depth` transformer blocks over the H*W tokens -> proj_out, plus a residual.

    proj_in/out are 1x1 convs on the image (SD1.x) or Linear layers on the tokens (use_linear_projection:
    SD2, SDXL). Same maths, same key names; only the weight shapes differ, (C, C, 1, 1) against (C, C).
    """

    def __init__(self, channels, *, heads, depth, context_dim, groups, linear_projection):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear_projection else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads=heads, context_dim=context_dim)
                                                 for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels) if linear_projection else nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        h, w = x.shape[-2:]
        tokens = self.project_in(self.norm(x))          # (B, H*W, C)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.project_out(tokens, h, w) + x       # (B, C, H, W)

    def project_in(self, x):
        """proj_in, (B, C, H, W) -> (B, H*W, C): a Linear acts on the tokens, a 1x1 conv on the image."""
        if self.linear_projection:
            return self.proj_in(image_to_tokens(x))
        return image_to_tokens(self.proj_in(x))

    def project_out(self, tokens, h, w):
        """proj_out, (B, H*W, C) -> (B, C, H, W)."""
        if self.linear_projection:
            return tokens_to_image(self.proj_out(tokens), h, w)
        return self.proj_out(tokens_to_image(tokens, h, w))


class DownBlock(nn.Module):
    """One resolution level on the way down: (ResNet [, Transformer]) x num_layers, then an optional stride-2
    conv. Returns the output and every intermediate state, which the up path consumes as skip connections.
    `transformer`: the keyword arguments of the level's Transformer2DModels, None for a level without attention."""

    def __init__(self, *, in_channels, out_channels, num_layers, temb_channels, groups, eps, transformer=None,
                 downsample=False, downsample_padding=1):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                          groups=groups, eps=eps) for i in range(num_layers)])
        self.attentions = None if transformer is None else nn.ModuleList([
            Transformer2DModel(out_channels, **transformer) for _ in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)]) if downsample else None

    def forward(self, x, emb, context, residual=None):
        """`residual`: an adapter feature (see the module docstring for where it is added)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
                if residual is not None and i == len(self.resnets) - 1:
                    x = x + residual
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        if residual is not None and self.attentions is None:
            x = skips[-1] = x + residual
        return x, skips


class UpBlock(nn.Module):
    """One level on the way up: (concat a skip, ResNet [, Transformer]) per skip, then an optional upsample.
    `skip_channels` lists the channels of the skips in the order they are consumed (the latest first)."""

    def __init__(self, *, in_channels, skip_channels, out_channels, temb_channels, groups, eps, transformer=None,
                 upsample=False):
        super().__init__()
        inputs = [in_channels] + [out_channels] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList([
            ResnetBlock2D(c + s, out_channels, temb_channels=temb_channels, groups=groups, eps=eps)
            for c, s in zip(inputs, skip_channels)])
        self.attentions = None if transformer is None else nn.ModuleList([
            Transformer2DModel(out_channels, **transformer) for _ in skip_channels])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x, skips, emb, context, size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), emb)   # the latest skip first
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        return x if self.upsamplers is None else self.upsamplers[0](x, size)


class MidBlock(nn.Module):
    """ResNet -> Transformer -> ResNet at the lowest resolution."""

    def __init__(self, *, channels, temb_channels, groups, eps, transformer):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels=temb_channels, groups=groups, eps=eps) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(channels, **transformer)])

    def forward(self, x, emb, context):
        x = self.resnets[0](x, emb)
        return self.resnets[1](self.attentions[0](x, context), emb)


class UNet2DConditionModel(nn.Module):
    """The whole UNet for a UNetConfig; see the module docstring for the data flow."""

    def __init__(self, cfg: "UNetConfig"):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.gradient_checkpointing = False
        ch, layers = list(cfg.block_out_channels), cfg.levels("layers_per_block")
        n, temb = len(ch), 4 * ch[0]
        norm = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        heads, depth = cfg.levels("attention_head_dim"), cfg.levels("transformer_layers_per_block")
        context_dim = cfg.levels("cross_attention_dim")

        def transformer(level):
            """Keyword arguments of the Transformer2DModels at `level` (all but their width)."""
            return dict(heads=heads[level], depth=depth[level], context_dim=context_dim[level],
                        groups=cfg.norm_num_groups, linear_projection=cfg.use_linear_projection)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        skip_channels = [ch[0]]               # channels of every state the up path will concatenate
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.levels("down_block_types")):
            downsample = i < n - 1
            self.down_blocks.append(DownBlock(
                in_channels=ch[max(i - 1, 0)], out_channels=ch[i], num_layers=layers[i], temb_channels=temb,
                transformer=transformer(i) if kind == "CrossAttnDownBlock2D" else None,
                downsample=downsample, downsample_padding=cfg.downsample_padding, **norm))
            skip_channels += [ch[i]] * (layers[i] + downsample)

        self.mid_block = MidBlock(channels=ch[-1], temb_channels=temb, transformer=transformer(n - 1), **norm)

        self.up_blocks = nn.ModuleList()
        in_channels = ch[-1]
        for i, kind in enumerate(cfg.levels("up_block_types")):     # up_blocks[0] is the lowest resolution
            level = n - 1 - i
            k = layers[level] + 1
            skip_channels, mine = skip_channels[:-k], skip_channels[-k:][::-1]
            self.up_blocks.append(UpBlock(
                in_channels=in_channels, skip_channels=mine, out_channels=ch[level], temb_channels=temb,
                transformer=transformer(level) if kind == "CrossAttnUpBlock2D" else None, upsample=level > 0,
                **norm))
            in_channels = ch[level]

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def enable_gradient_checkpointing(self, on=True):
        """Recompute each block's activations in the backward pass instead of storing them (saves memory)."""
        self.gradient_checkpointing = on
        return self

    def _run(self, block, *args):
        """block(*args), checkpointed when enabled."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed(self, t, batch, dtype, added_cond=None):
        """Timestep (scalar or (B,)) [+ SDXL micro-conditioning] -> (B, 4*C0) embedding."""
        cfg = self.config
        t = torch.as_tensor(t, device=self.conv_in.weight.device).reshape(-1).expand(batch)
        # The sinusoid is computed in fp32 (large t times high frequencies loses phase in fp16), then cast.
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                     cfg.freq_shift).to(dtype))
        if cfg.addition_embed_type == "text_time":
            if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs "
                                 "added_cond={'text_embeds': (B, 1280), 'time_ids': (B, 6)}")
            text, ids = added_cond["text_embeds"], added_cond["time_ids"]
            ids = timestep_embedding(ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            emb = emb + self.add_embedding(torch.cat([text, ids.reshape(text.shape[0], -1)], dim=-1).to(dtype))
        return emb

    def forward(self, x, t, context, added_cond=None, return_mid=False, concat=None, adapter_residuals=None):
        """x (B, C, H, W) noisy latents, t timesteps, context (B, L, cross_attention_dim) text states;
        concat (B, in_channels - C, H, W) image conditions; adapter_residuals: a list of adapter features.
        Returns the eps / v prediction (B, out_channels, H, W), and the mid-block output if return_mid."""
        emb = self.embed(t, x.shape[0], x.dtype, added_cond)
        context = context.to(x.dtype)
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"this UNet takes {self.config.in_channels} input channels, got {x.shape[1]} "
                             "(the noisy latent plus `concat`: an inpainting / super-resolution condition?)")
        residuals = [r.to(x.dtype) for r in adapter_residuals or []]

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            residual = residuals.pop(0) if residuals else None
            h, states = self._run(block, h, emb, context, residual)
            skips += states
        h = mid = self._run(self.mid_block, h, emb, context)
        if residuals and residuals[0].shape == h.shape:        # T2I-Adapter-XL's last feature
            h = mid = h + residuals.pop(0)
        for block in self.up_blocks:
            k = len(block.resnets)
            skips, mine = skips[:-k], skips[-k:]
            # Upsample to the size of the next skip, so odd latent sizes round-trip (10 -> 5 -> 3 -> 5 -> 10).
            size = skips[-1].shape[-2:] if skips else None
            h = self._run(block, h, mine, emb, context, size)
        out = self.conv_out(self.conv_norm_out(h))
        return (out, mid) if return_mid else out


# ----------------------------------------------------------------------------- config

@dataclass
class UNetConfig:
    """diffusers' UNet2DConditionModel config fields that the released SD models use.

    NOTE `attention_head_dim` is, despite its name, the number of attention HEADS per level (a diffusers
    naming slip kept for compatibility: "num_attention_heads = num_attention_heads or attention_head_dim").
    SD1.5: 8 heads everywhere (head dims 40/80/160); SD2.x: [5, 10, 20, 20] and SDXL: [5, 10, 20] heads,
    i.e. head dim 64. Per-level fields accept one int or a list with one entry per level.
    """
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 768
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8         # = number of heads (see above)
    use_linear_projection: bool = False         # SD2/SDXL: Linear proj_in/out instead of 1x1 convs
    upcast_attention: bool = False
    addition_embed_type: str = None             # "text_time" for SDXL
    addition_time_embed_dim: int = None         # 256 for SDXL: each of the 6 size/crop ids is embedded to this
    projection_class_embeddings_input_dim: int = None  # 2816 for SDXL = 1280 pooled text + 6 * 256

    @classmethod
    def from_config_json(cls, config, source="unet config"):
        """A diffusers config.json (a dict, or a path to the file). Irrelevant keys are ignored; keys whose
        value would change the network in a way this file does not implement raise a ValueError."""
        if not isinstance(config, dict):
            source = str(config)
            config = read_json(config, "unet config")
        if isinstance(config, dict) and "upcast_attention" in config and config["upcast_attention"] is None:
            config = {**config, "upcast_attention": False}      # SDXL's config says null
        kwargs = checked_kwargs(cls, config, source)
        for key, allowed in _ONLY.items():
            value = config.get(key, allowed[0])
            if isinstance(value, list) and value and all(v in allowed for v in value):
                continue
            if value not in allowed:
                raise ValueError(f"{source}: {key}={value!r} is not supported (supported: {allowed[0]!r})")
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    def levels(self, name):
        """A per-level field as a list with one entry per resolution level."""
        value = getattr(self, name)
        return list(value) if isinstance(value, (list, tuple)) else [value] * len(self.block_out_channels)

    def validate(self, source="unet config"):
        """Raise a ValueError naming the field if this config is not one the model can build."""
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "layers_per_block", "cross_attention_dim",
                     "transformer_layers_per_block", "attention_head_dim"):
            if len(self.levels(name)) != n:
                raise ValueError(f"{source}: {name} has {len(self.levels(name))} entries for {n} levels")
        for name, ok in (("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D")),
                         ("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D"))):
            bad = [b for b in self.levels(name) if b not in ok]
            if bad:
                raise ValueError(f"{source}: {name} {bad} not supported (only {' / '.join(ok)})")
        if any(isinstance(d, (list, tuple)) for d in self.levels("transformer_layers_per_block")):
            raise ValueError(f"{source}: nested transformer_layers_per_block is not supported")
        for c, heads in zip(self.block_out_channels, self.levels("attention_head_dim")):
            if c % heads or c % self.norm_num_groups:
                raise ValueError(f"{source}: {c} channels do not split into {heads} heads / {self.norm_num_groups} groups")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"{source}: addition_embed_type={self.addition_embed_type!r} is not supported "
                             "(only None or 'text_time')")
        if self.addition_embed_type and not (self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ValueError(f"{source}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")


# diffusers fields that the released SD models leave at one value; any other value is refused.
_ONLY = {
    "act_fn": ("silu",), "mid_block_type": ("UNetMidBlock2DCrossAttn",), "center_input_sample": (False,),
    "only_cross_attention": (False,), "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,), "class_embed_type": (None,), "num_class_embeds": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "num_attention_heads": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "attention_type": ("default",), "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,), "mid_block_scale_factor": (1, 1.0), "dropout": (0.0, 0),
}

_SD2 = dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
CONFIGS = {
    "sd15": UNetConfig(),
    "sd15-inpaint": UNetConfig(in_channels=9),  # noisy latent 4 + mask 1 + masked-image latent 4
    "sd2": UNetConfig(sample_size=96, upcast_attention=True, **_SD2),  # SD2.1 768-v (v-prediction)
    "sd2-base": UNetConfig(**_SD2),                                    # SD2.x 512 (eps)
    "sdxl": UNetConfig(
        sample_size=128, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816),
}
