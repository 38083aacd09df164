"""Stable Diffusion 3 / 3.5 multimodal diffusion transformer (MMDiT), a rectified-flow velocity model.

Paper: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3,
arXiv 2403.03206), Sec. 4 and Fig. 2; SD3.5 adds RMS qk-norm and, in SD3.5-medium, MMDiT-X blocks (a
second, image-only self-attention in the first 13 blocks). Upstream layout: diffusers'
`SD3Transformer2DModel`; the module tree below equals its checkpoint key tree, so a diffusers
`transformer/` folder loads with no renaming (weights/sd3.py reads it).

Shape of one forward pass, latent (B, 16, H, W) with patch p and width C = heads * head_dim:
    patchify + the centre crop of a fixed (M x M) 2-D sin-cos table    -> x (B, N, C), N = (H/p)(W/p)
    t -> sinusoid -> MLP, plus the pooled CLIP vector -> MLP            -> temb (B, C)
    context (B, L, 4096) -> Linear                                      -> c (B, L, C)
    joint blocks: each stream gets its own adaLN-Zero modulation (shift, scale, gate) from temb and its
        own projections, then ONE attention over the concatenation [x; c]; the last block updates only
        x ("context_pre_only"), since nothing reads c after it
    final adaLN (scale, shift) + Linear C -> p*p*16, unpatchify         -> v (B, 16, H, W)

The output is the flow velocity v = eps - x0 of x_t = (1 - sigma) x0 + sigma eps (flash/flow.py).

Deviations from diffusers (on CPU in fp32 the outputs agree to ~1e-6, tests/test_mmdit.py):
- Only the configs SD3 / SD3.5 ship are supported: qk_norm None or "rms_norm", a pos_embed_max_size
  (the cropped table), caption_projection_dim equal to the width. Others are refused by name.
- Dropout, attention processors, fused-QKV switches, ControlNet residuals, skip-layer guidance and
  IP-adapters are left out. Gradient checkpointing is per block, as flash/dit.py.
"""
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

import kernels
from flash.dit import sincos_pos_embed_2d, unpatchify
from flash.io import read_json
from flash.layers import FeedForward, TimestepEmbedding, timestep_embedding

EPS = 1e-6  # every LayerNorm and RMSNorm of the model


class PatchEmbed(nn.Module):
    """Conv p x p stride p to tokens, plus the centre (h, w) crop of a fixed M x M positional table.

    The table is a persistent buffer upstream (so checkpoints hold it, as `pos_embed.pos_embed`): a model
    trained at one size keeps the same position codes for the same central tokens at every other size.
    """

    def __init__(self, cfg):
        super().__init__()
        p, m = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, p, stride=p)
        self.max_size = m
        # Built on the current default device (the meta device under weights' loaders: the file fills it).
        table = sincos_pos_embed_2d(cfg.inner_dim, m, m, base_size=cfg.sample_size // p, interpolation_scale=1.0)
        self.register_buffer("pos_embed", table[None])  # (1, M*M, C), fp32

    def cropped_pos_embed(self, h, w):
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"a {h}x{w} token grid exceeds this model's positional table "
                             f"({self.max_size}x{self.max_size} tokens, pos_embed_max_size)")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w]
        return table.reshape(1, h * w, -1)

    def forward(self, x):
        x = self.proj(x)  # (B, C, h, w)
        h, w = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), row-major, a view as upstream
        # Sum in the table's dtype, cast back, then made contiguous, as diffusers does (layout: flash/layers.py).
        return (tokens + self.cropped_pos_embed(h, w)).to(tokens.dtype).contiguous()


class TimeTextEmbedding(nn.Module):
    """temb = MLP(sinusoid(t)) + MLP(pooled text): the vector every adaLN in the model is modulated by.
    The pooled MLP has the same two-Linear-SiLU shape as the timestep one (upstream names it text_embedder)."""

    def __init__(self, dim, pooled_dim):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def forward(self, t, pooled):
        # Sinusoid in fp32, MLPs in the pooled vector's dtype, as upstream.
        return self.timestep_embedder(timestep_embedding(t, 256).to(pooled.dtype)) + self.text_embedder(pooled)


class Modulation(nn.Module):
    """adaLN's projection SiLU(temb) -> n vectors of width C, each (B, 1, C) to broadcast over tokens.
    Upstream wraps it with the parameter-free LayerNorm it modulates (AdaLayerNormZero: n = 6, shift,
    scale, gate for attention and MLP; SD35AdaLayerNormZeroX: n = 9; AdaLayerNormContinuous: n = 2, in
    the order scale, shift); only `linear` holds weights, so only it is a module here."""

    def __init__(self, dim, n):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb):
        return self.linear(F.silu(temb))[:, None].chunk(self.n, dim=-1)


def modulate(x, shift, scale):
    """LayerNorm (no affine, eps 1e-6) then x * (1 + scale) + shift, through the fused kernel."""
    return kernels.layer_norm_modulated(x, shift, scale, eps=EPS)


class RMSNorm(nn.Module):
    """Per-head RMS norm of queries and keys (SD3.5's qk_norm="rms_norm"), statistics in fp32."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, EPS)


class JointAttention(nn.Module):
    """Multi-head attention with diffusers' key names. Image stream: to_q/k/v, to_out.0 (norm_q/k); context
    stream, when `context_dim` is given: add_q/k/v_proj, to_add_out (norm_added_q/k). Both streams' tokens
    attend to each other in one softmax; with `context_pre_only` the context output is not projected (it
    is dropped). With no context stream it is plain self-attention (the MMDiT-X `attn2`)."""

    def __init__(self, dim, heads, head_dim, qk_norm, context=False, context_pre_only=False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = (RMSNorm(head_dim), RMSNorm(head_dim)) if qk_norm else (None, None)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])  # index 1: upstream's Dropout
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q, self.norm_added_k = (RMSNorm(head_dim), RMSNorm(head_dim)) if qk_norm else (None, None)
            self.to_add_out = None if context_pre_only else nn.Linear(inner, dim)

    def _heads(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.heads) for f in (to_q, to_k, to_v))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def forward(self, x, c=None):
        q, k, v = self._heads(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if c is not None:
            qc, kc, vc = self._heads(c, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                     self.norm_added_q, self.norm_added_k)
            q, k, v = (torch.cat(pair, dim=2) for pair in ((q, qc), (k, kc), (v, vc)))  # image tokens first
        out = rearrange(kernels.attention(q, k, v), "b h l d -> b l (h d)")
        x_out = self.to_out[0](out[:, :x.shape[1]])
        if c is None:
            return x_out
        return x_out, (None if self.to_add_out is None else self.to_add_out(out[:, x.shape[1]:]))


class JointTransformerBlock(nn.Module):
    """One MMDiT block (SD3 Fig. 2b): two streams with their own weights, one joint attention.

    norm1 / norm1_context hold the adaLN-Zero projections, ff / ff_context the MLPs. context_pre_only (the
    last block): the context stream is only normalised and read, so it has a 2-vector adaLN and no MLP.
    dual (MMDiT-X, SD3.5-medium): norm1 gives 3 more vectors for `attn2`, an image-only self-attention.
    """

    def __init__(self, cfg, context_pre_only=False, dual=False):
        super().__init__()
        dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = Modulation(dim, 9 if dual else 6)
        self.norm1_context = Modulation(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, heads, head_dim, cfg.qk_norm, context=True, context_pre_only=context_pre_only)
        self.attn2 = JointAttention(dim, heads, head_dim, cfg.qk_norm) if dual else None
        self.ff = FeedForward(dim, inner=4 * dim, activation="gelu-tanh")
        self.ff_context = None if context_pre_only else FeedForward(dim, inner=4 * dim, activation="gelu-tanh")

    def forward(self, x, c, temb):
        mod = self.norm1(temb)  # each (B, 1, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(temb)  # AdaLayerNormContinuous's order: scale first
            c_in = modulate(c, c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            c_in = modulate(c, c_shift_msa, c_scale_msa)

        x_attn, c_attn = self.attn(modulate(x, shift_msa, scale_msa), c_in)
        x_new = x + gate_msa * x_attn
        if self.dual:  # the second attention reads the block's INPUT, modulated by its own shift and scale
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            x_new = x_new + gate_msa2 * self.attn2(modulate(x, shift_msa2, scale_msa2))
        x = x_new + gate_mlp * self.ff(modulate(x_new, shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa * c_attn
        return x, c + c_gate_mlp * self.ff_context(modulate(c, c_shift_mlp, c_scale_mlp))


class SD3Transformer2DModel(nn.Module):
    """The whole MMDiT for an SD3Config; see the module docstring for the data flow."""

    def __init__(self, cfg: "SD3Config"):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        dim, n = cfg.inner_dim, cfg.num_layers
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbedding(dim, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(cfg, context_pre_only=i == n - 1, dual=i in cfg.dual_attention_layers)
            for i in range(n)])
        self.norm_out = Modulation(dim, 2)  # AdaLayerNormContinuous: (scale, shift)
        self.proj_out = nn.Linear(dim, cfg.patch_size ** 2 * cfg.out_channels)

    def enable_gradient_checkpointing(self, on=True):
        """Recompute each block's activations in the backward pass instead of storing them (saves memory)."""
        self.gradient_checkpointing = on
        return self

    @property
    def mid_block_index(self):
        """The block whose image tokens are the discriminator's feature map: depth // 2 - 1 (as flash/dit.py)."""
        return len(self.transformer_blocks) // 2 - 1

    def forward(self, x, t, context, pooled, return_mid=False):
        """x (B, in, H, W) latents, t (B,) or scalar timesteps in [0, 1000] (sigma * 1000), context (B, L,
        joint_attention_dim) text states, pooled (B, pooled_projection_dim). Returns the velocity (B, out,
        H, W), or (that, mid image tokens (B, C, H/p, W/p)) with return_mid."""
        b, p = x.shape[0], self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.pos_embed(x)  # (B, N, C)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        temb = self.time_text_embed(t, pooled.to(x.dtype))  # (B, C)
        c = self.context_embedder(context.to(x.dtype))  # (B, L, C)

        mid = None
        for i, block in enumerate(self.transformer_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, c = checkpoint(block, x, c, temb, use_reentrant=False)
            else:
                x, c = block(x, c, temb)
            if i == self.mid_block_index:
                mid = x.transpose(1, 2).reshape(b, -1, h, w)

        scale, shift = self.norm_out(temb)
        x = self.proj_out(modulate(x, shift, scale))
        out = unpatchify(x, h, w, p, self.config.out_channels)
        return (out, mid) if return_mid else out


# ----------------------------------------------------------------------------- config

@dataclass
class SD3Config:
    """Field names are diffusers' SD3Transformer2DModel config keys; defaults are its defaults."""
    sample_size: int = 128  # latent side trained at: sets the positional table's base size
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # width of the text states (T5-XXL's, CLIP's zero-padded to it)
    caption_projection_dim: int = 1152  # must equal the width (heads * head_dim)
    pooled_projection_dim: int = 2048  # CLIP-L (768) ++ bigG (1280) projections
    out_channels: int = 16
    pos_embed_max_size: int = 96  # side of the square positional table, in tokens
    dual_attention_layers: tuple = ()  # MMDiT-X blocks (SD3.5-medium: 0..12)
    qk_norm: str | None = None  # None (SD3) or "rms_norm" (SD3.5)

    def __post_init__(self):
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported by the SD3 transformer (only None or 'rms_norm')")
        if not self.pos_embed_max_size:
            raise ValueError("pos_embed_max_size=None (an interpolated positional table) is not supported; "
                             "SD3 and SD3.5 crop a fixed table")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim={self.caption_projection_dim} must equal the width "
                             f"num_attention_heads * attention_head_dim = {self.inner_dim}")
        if self.inner_dim % 4:
            raise ValueError(f"SD3 width {self.inner_dim} must be a multiple of 4 (2-D sin-cos positions)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers={list(bad)} are outside the {self.num_layers} blocks")

    @property
    def inner_dim(self):
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_config_json(cls, source, name=None):
        """A diffusers config.json (path or dict). Irrelevant keys are ignored; values this model cannot
        honour raise a one-line ValueError naming the field."""
        if isinstance(source, dict):
            cfg, name = source, name or "config"
        else:
            cfg, name = read_json(Path(source), "transformer config"), name or str(source)
        if cfg.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
            raise ValueError(f"{name}: _class_name={cfg['_class_name']!r} is not an SD3Transformer2DModel config")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in known}
        if kw.get("out_channels", 0) is None:  # diffusers: None means "same as in_channels"
            kw["out_channels"] = kw.get("in_channels", cls.in_channels)
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from None


CONFIGS = {
    # The released transformer/config.json values (stabilityai/stable-diffusion-3-medium-diffusers,
    # stable-diffusion-3.5-medium, stable-diffusion-3.5-large); the rest are diffusers' defaults.
    "sd3-medium": SD3Config(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                            pos_embed_max_size=192),
    "sd3.5-medium": SD3Config(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                              pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": SD3Config(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                             pos_embed_max_size=192, qk_norm="rms_norm"),
}


def build(name_or_config, device=None):
    """A model from a preset name or an SD3Config (device="meta" for a weightless skeleton)."""
    if isinstance(name_or_config, str):
        if name_or_config not in CONFIGS:
            raise ValueError(f"unknown SD3 preset {name_or_config!r}; known: {', '.join(CONFIGS)}")
        name_or_config = CONFIGS[name_or_config]
    with torch.device(device or "cpu"):
        return SD3Transformer2DModel(replace(name_or_config))
