"""PixArt-alpha diffusion transformer (DiT with adaLN-single and T5 cross-attention).

Paper: Chen et al., "PixArt-alpha: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image
Synthesis" (arXiv 2310.00426), built on Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT).
Upstream layout: diffusers' `PixArtTransformer2DModel` (the module tree below equals its checkpoint key
tree, so a diffusers `transformer/` folder loads with no renaming; weights/pixart.py converts the original
PixArt layout).

Shape of one forward pass, latent (B, 4, H, W) with patch p and width C:
    patchify + fixed 2-D sin-cos positions  -> (B, N, C), N = (H/p)(W/p)
    adaLN-single: t (and, for the 1024-MS model, resolution and aspect ratio) -> one (B, 6C) modulation
        vector shared by all blocks; each block adds its own learned `scale_shift_table` (6, C)
    blocks: x += gate * SelfAttn(modulated LN(x)); x += CrossAttn(x, caption); x += gate * FF(modulated LN(x))
    final modulated LN, Linear C -> p*p*out, unpatchify -> (B, 8, H, W) (eps ++ learned variance)

Deviations from diffusers (on CPU in fp32 the outputs agree bitwise, except for an all-padding caption):
- The positional table is computed on the fly and cached per (size, device), never a module buffer.
  diffusers keeps it as a non-persistent buffer, so its checkpoints do not hold it either; computing it
  lazily keeps a meta-device build free of tensors that `load_state_dict(assign=True)` cannot fill.
- The caption mask is a boolean key-padding mask (diffusers adds a -10000 bias). A caption whose mask is
  all zeros attends to every token, which is what the -10000 bias amounts to (upstream's fp32 `s - 10000`
  also rounds the logits by ~1e-3 there; we do not), instead of producing NaN.
- Dropout, attention processors and fused-QKV switches are left out. Gradient checkpointing is per block
  (`enable_gradient_checkpointing`, as flash/unet.py).
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

import kernels
from flash.config_check import checked_kwargs
from flash.io import read_json
from flash.layers import Attention, FeedForward, TimestepEmbedding, timestep_embedding


class PatchEmbed(nn.Module):
    """Conv p x p stride p to tokens, plus the fixed positional table (recomputed when the size changes)."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size)
        self.base_size = cfg.sample_size // cfg.patch_size
        self.interpolation_scale = cfg.interpolation_scale
        self._pos_cache = {}  # (h, w, device) -> (1, h*w, C) fp32; not a buffer, see the file docstring

    def pos_embed(self, h, w, device):
        key = (h, w, str(device))
        if key not in self._pos_cache:
            table = sincos_pos_embed_2d(self.proj.out_channels, h, w, self.base_size, self.interpolation_scale, device)
            self._pos_cache[key] = table[None]
        return self._pos_cache[key]

    def forward(self, x):
        x = self.proj(x)  # (B, C, h, w)
        h, w = x.shape[-2:]
        # (B, N, C), N = h*w row-major: a view, as in diffusers (einops would copy; layout matters, flash/layers.py)
        tokens = x.flatten(2).transpose(1, 2)
        # The sum is taken in fp32 (the table's dtype), then cast back, as upstream does.
        return (tokens + self.pos_embed(h, w, x.device)).to(tokens.dtype)


class TimestepSizeEmbedding(nn.Module):
    """t -> C; for the MS model also resolution (2 values) and aspect ratio (1 value), each -> C/3, summed in."""

    def __init__(self, dim, *, use_additional_conditions):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.use_additional_conditions = use_additional_conditions
        if use_additional_conditions:
            self.resolution_embedder = TimestepEmbedding(256, dim // 3)
            self.aspect_ratio_embedder = TimestepEmbedding(256, dim // 3)

    def forward(self, t, added_cond, dtype):
        emb = self.timestep_embedder(timestep_embedding(t, 256).to(dtype))  # sinusoid in fp32, MLP in model dtype
        if not self.use_additional_conditions:
            return emb
        if added_cond is None:
            raise ValueError("this PixArt model (use_additional_conditions) needs added_cond={'resolution': (B, 2), "
                             "'aspect_ratio': (B, 1)}; see flash.dit.additional_conditions")
        b = t.shape[0]
        res, ar = added_cond["resolution"], added_cond["aspect_ratio"]
        # Each scalar (height, width, ratio) gets its own sinusoid, exactly like a timestep.
        res = self.resolution_embedder(timestep_embedding(res.reshape(-1), 256).to(dtype)).reshape(b, -1)  # (B, 2C/3)
        ar = self.aspect_ratio_embedder(timestep_embedding(ar.reshape(-1), 256).to(dtype)).reshape(b, -1)  # (B, C/3)
        return emb + torch.cat([res, ar], dim=1)


class AdaLayerNormSingle(nn.Module):
    """adaLN-single (PixArt Sec. 2.3): ONE Linear C -> 6C from the condition, shared by all blocks."""

    def __init__(self, dim, *, use_additional_conditions):
        super().__init__()
        self.emb = TimestepSizeEmbedding(dim, use_additional_conditions=use_additional_conditions)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t, added_cond, dtype):
        emb = self.emb(t, added_cond, dtype)  # (B, C), reused by the final layer
        return self.linear(F.silu(emb)), emb  # (B, 6C)


class CaptionProjection(nn.Module):
    """T5 features (4096) -> model width: Linear, GELU(tanh), Linear."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class PixArtBlock(nn.Module):
    """One transformer block. norm1/norm2 have no affine parameters (so no modules): only their eps is kept."""

    def __init__(self, cfg):
        super().__init__()
        dim = cfg.inner_dim
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)
        attn = dict(heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, qkv_bias=cfg.attention_bias)
        self.attn1 = Attention(dim, **attn)
        self.attn2 = Attention(dim, context_dim=cfg.cross_attention_dim, **attn)
        self.ff = FeedForward(dim, inner=4 * dim, activation="gelu-tanh")

    def forward(self, x, t6, context, context_mask):
        # The shared (B, 6C) modulation plus this block's own learned offsets.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t6.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)  # each (B, 1, C)
        x = x + gate_msa * self.attn1(kernels.layer_norm_modulated(x, shift_msa, scale_msa, eps=self.eps))
        # Cross-attention reads the raw residual stream: PixArt applies no norm before it.
        x = x + self.attn2(x, context, key_padding_mask=context_mask)
        return x + gate_mlp * self.ff(kernels.layer_norm_modulated(x, shift_mlp, scale_mlp, eps=self.eps))


class PixArtTransformer2DModel(nn.Module):
    """The whole transformer for a PixArtConfig; see the module docstring for the data flow."""

    def __init__(self, cfg: "PixArtConfig"):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        dim = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg)
        self.transformer_blocks = nn.ModuleList([PixArtBlock(cfg) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)
        self.proj_out = nn.Linear(dim, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaln_single = AdaLayerNormSingle(dim, use_additional_conditions=cfg.use_additional_conditions)
        self.caption_projection = CaptionProjection(cfg.caption_channels, dim) if cfg.caption_channels else None

    def enable_gradient_checkpointing(self, on=True):
        """Recompute each block's activations in the backward pass instead of storing them (saves memory)."""
        self.gradient_checkpointing = on
        return self

    @property
    def mid_block_index(self):
        """Index of the block whose output is the discriminator's feature map: the last block of the first
        half, depth // 2 - 1 (13 of 0..27 for PixArt-XL)."""
        return len(self.transformer_blocks) // 2 - 1

    def forward(self, x, t, context, context_mask=None, added_cond=None, return_mid=False):
        """x (B, in, H, W) latents, t (B,) or scalar timesteps, context (B, L, caption_channels) T5 features,
        context_mask (B, L) 1/True = real token, added_cond for the 1024-MS model (see additional_conditions).
        Returns (B, out, H, W), or (that, mid features (B, C, H/p, W/p)) with return_mid."""
        b, p = x.shape[0], self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.pos_embed(x)  # (B, N, C)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        t6, t_emb = self.adaln_single(t, added_cond, x.dtype)
        context = context.to(x.dtype)
        if self.caption_projection is not None:
            context = self.caption_projection(context)  # (B, L, C)
        if context_mask is not None:
            context_mask = context_mask.bool()
            # An all-padding caption attends to everything (what upstream's -10000 bias does) rather than NaN.
            context_mask = context_mask | ~context_mask.any(dim=-1, keepdim=True)

        mid = None
        for i, block in enumerate(self.transformer_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, t6, context, context_mask, use_reentrant=False)
            else:
                x = block(x, t6, context, context_mask)
            if i == self.mid_block_index:
                mid = x.transpose(1, 2).reshape(b, -1, h, w)  # (B, C, h, w), a view like the tokens above

        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # (B, 1, C) each
        x = self.proj_out(kernels.layer_norm_modulated(x, shift, scale, eps=1e-6))  # norm_out's eps is fixed upstream
        out = unpatchify(x, h, w, p, self.config.out_channels)
        return (out, mid) if return_mid else out


# ----------------------------------------------------------------------------- patches and positions

def unpatchify(x, h, w, p, c):
    """(B, h*w, p*p*c) with channels ordered (p_row, p_col, c) -> (B, c, h*p, w*p)."""
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p, c=c)


def sincos_1d(dim, pos):
    """(M,) positions -> (M, dim) [sin | cos], frequencies 10000^(-i/(dim/2)); fp64 like upstream."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    out = torch.outer(pos.double(), 1.0 / 10000 ** omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim, height, width, base_size, interpolation_scale, device=None):
    """Fixed DiT positions for a (height, width) token grid, (height*width, dim) in fp32, row-major.

    Coordinates are rescaled so every grid spans [0, base_size / interpolation_scale): a model trained at
    one size sees a stretched or squeezed version of the same table at another (PixArt's "lewei scale").
    The first half of the channels encodes the column, the second half the row (upstream's order).
    """
    rows = torch.arange(height, dtype=torch.float32, device=device) / (height / base_size) / interpolation_scale
    cols = torch.arange(width, dtype=torch.float32, device=device) / (width / base_size) / interpolation_scale
    rows, cols = rows[:, None].expand(height, width).reshape(-1), cols[None, :].expand(height, width).reshape(-1)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def additional_conditions(height, width, batch_size, device=None):
    """The 1024-MS model's extra inputs for images of (height, width) pixels, as diffusers' pipeline builds them."""
    resolution = torch.tensor([[float(height), float(width)]], device=device).repeat(batch_size, 1)  # (B, 2)
    aspect_ratio = torch.tensor([[float(height / width)]], device=device).repeat(batch_size, 1)  # (B, 1)
    return {"resolution": resolution, "aspect_ratio": aspect_ratio}


# ----------------------------------------------------------------------------- config

@dataclass
class PixArtConfig:
    """Field names are diffusers' PixArtTransformer2DModel config keys."""
    num_attention_heads: int = 16
    attention_head_dim: int = 72  # the per-head width here (unlike the SD UNet config, where it counts heads)
    in_channels: int = 4
    out_channels: int = 8  # eps ++ learned variance; samplers use the first in_channels
    num_layers: int = 28
    cross_attention_dim: int = 1152  # width of the caption tokens after caption_projection
    attention_bias: bool = True  # bias on to_q / to_k / to_v (to_out always has one)
    sample_size: int = 128  # latent side the model was trained at; sets the positional grid's base size
    patch_size: int = 2
    norm_eps: float = 1e-6
    # None means diffusers' default: max(sample_size // 64, 1), i.e. 1 for 512 px models, 2 for 1024 px.
    interpolation_scale: float | None = None
    # None means diffusers' default: on exactly when sample_size == 128 (the 1024-MS model).
    use_additional_conditions: bool | None = None
    caption_channels: int | None = 4096  # T5-XXL width; None = captions arrive already projected

    def __post_init__(self):
        if self.interpolation_scale is None:
            self.interpolation_scale = max(self.sample_size // 64, 1)
        if self.use_additional_conditions is None:
            self.use_additional_conditions = self.sample_size == 128
        if self.inner_dim % 4:
            raise ValueError(f"PixArt width {self.inner_dim} must be a multiple of 4 (2-D sin-cos positions)")
        if self.use_additional_conditions and self.inner_dim % 3:
            raise ValueError(f"PixArt width {self.inner_dim} must be a multiple of 3 with use_additional_conditions "
                             "(resolution takes 2/3 of it, aspect ratio 1/3)")

    @property
    def inner_dim(self):
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_config_json(cls, source):
        """A diffusers config.json (path or dict). Irrelevant keys are ignored; values this model cannot
        honour raise a one-line ValueError. Accepts the released `Transformer2DModel` class name too."""
        name = str(source)
        if isinstance(source, dict):
            cfg, name = source, "config"
        else:
            cfg = read_json(source, "transformer config")
        if not isinstance(cfg, dict):
            raise ValueError(f"{name}: must hold a JSON object ({{...}}), got a {type(cfg).__name__}")
        if cfg.get("_class_name", "PixArtTransformer2DModel") not in ("PixArtTransformer2DModel", "Transformer2DModel"):
            raise ValueError(f"{name}: _class_name={cfg['_class_name']!r} is not a PixArt transformer config")
        if cfg.get("_class_name") == "Transformer2DModel" and cfg.get("norm_type") != "ada_norm_single":
            # The generic class is PixArt only with adaLN-single; otherwise it is an SD-style transformer.
            raise ValueError(f"{name}: a Transformer2DModel config is PixArt only with norm_type='ada_norm_single'")
        required = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_type": "default",
                    "norm_elementwise_affine": False, "only_cross_attention": False, "double_self_attention": False,
                    "num_vector_embeds": None, "dropout": 0.0}
        for key, value in required.items():
            if key in cfg and cfg[key] != value:
                raise ValueError(f"{name}: {key}={cfg[key]!r} is not supported by the PixArt transformer "
                                 f"(only {value!r})")
        if cfg.get("cross_attention_dim", 1) is None:
            raise ValueError(f"{name}: cross_attention_dim=None (no cross-attention) is not supported")
        if cfg.get("out_channels", 0) is None:  # diffusers: out_channels=None means "same as in_channels"
            cfg = {**cfg, "out_channels": cfg.get("in_channels", cls.in_channels)}
        kw = checked_kwargs(cls, cfg, name)
        return cls(**kw)


CONFIGS = {
    # Released diffusers configs of PixArt-alpha/PixArt-XL-2-{1024-MS,512x512}: they differ only by
    # sample_size, from which diffusers derives interpolation_scale and use_additional_conditions.
    "pixart-xl-2-1024-ms": PixArtConfig(sample_size=128),
    "pixart-xl-2-512": PixArtConfig(sample_size=64),
}


def build(name_or_config, device=None):
    """A model from a preset name or a PixArtConfig (device="meta" for a weightless skeleton)."""
    if isinstance(name_or_config, str):
        if name_or_config not in CONFIGS:
            raise ValueError(f"unknown PixArt preset {name_or_config!r}; known: {', '.join(CONFIGS)}")
        name_or_config = CONFIGS[name_or_config]
    cfg = name_or_config
    with torch.device(device or "cpu"):
        return PixArtTransformer2DModel(replace(cfg))
