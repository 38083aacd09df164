"""Blocks shared by the UNet, the VAE and the DiT, named as in diffusers checkpoints so weights load as-is.

Attention and normalisation go through `kernels/`: a CUDA run gets the Triton kernels, a CPU run PyTorch.

Memory layout is part of the numerics: a sum takes the layout (strides) of its first operand, and PyTorch's
CPU kernels (convs, group norm) can round differently for an NCHW tensor and a channels-last or transposed
view of the same values. So a residual whose input may be such a view is written f(x) + x, keeping f(x)'s
layout (no view's layout spreads through a stack of blocks), and token <-> image reshapes copy or stay views
where diffusers' do. Changing either changes CPU outputs in the last bits.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import kernels


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and keys) computed by kernels.group_norm, optionally fused with SiLU."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, silu=False):
        super().__init__(num_groups, num_channels, eps, affine)
        self.silu = silu

    def forward(self, x):
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and keys) computed by kernels.layer_norm."""

    def forward(self, x):
        return kernels.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Attention(nn.Module):
    """Multi-head attention with diffusers' key names: to_q, to_k, to_v, to_out.0.

    Self-attention when `context` is None, cross-attention otherwise. x: (B, L, C) -> (B, L, C).
    """

    def __init__(self, dim, *, heads, head_dim, context_dim=None, qkv_bias=False, out_bias=True):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        # diffusers keeps a Dropout at index 1; an Identity keeps the index (and the key to_out.0) aligned.
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias), nn.Identity()])

    def forward(self, x, context=None, key_padding_mask=None):
        context = x if context is None else context
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = kernels.attention(q, k, v, key_padding_mask=key_padding_mask)
        return self.to_out[0](rearrange(out, "b h l d -> b l (h d)"))


class GEGLU(nn.Module):
    """proj -> split into value and gate -> value * gelu(gate) (Shazeer 2020)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class GELU(nn.Module):
    """proj -> gelu (the tanh approximation in PixArt's feed-forward)."""

    def __init__(self, dim, inner, approximate="none"):
        super().__init__()
        self.proj = nn.Linear(dim, inner)
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """diffusers' FeedForward keys: net.0.proj (activation projection), net.1 (dropout), net.2 (output)."""

    def __init__(self, dim, *, inner=None, activation="geglu"):
        super().__init__()
        inner = inner or 4 * dim
        act = GEGLU(dim, inner) if activation == "geglu" else GELU(dim, inner, approximate="tanh")
        self.net = nn.ModuleList([act, nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000.0, scale=1.0):
    """Sinusoidal embedding of (B,) timesteps, in fp32 (DDPM / Transformer positional encoding).

    freq_i = exp(-ln(max_period) * i / (half - freq_shift)); flip_sin_to_cos puts cos first (SD, PixArt).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None] * scale
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2, the MLP on top of the sinusoidal embedding."""

    def __init__(self, in_dim, dim, out_dim=None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# ---- Convolutional blocks shared by the UNet and the VAE (diffusers' ResnetBlock2D, Downsample2D, Upsample2D) ----

class ResnetBlock2D(nn.Module):
    """norm1+SiLU -> conv1 (+ projected time embedding) -> norm2+SiLU -> conv2, plus a (1x1 conv) shortcut.

    `temb_channels=None` gives the VAE's block (no time_emb_proj). x: (B, Cin, H, W) -> (B, Cout, H, W).
    """

    def __init__(self, in_channels, out_channels=None, *, temb_channels=None, groups=32, eps=1e-6):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, silu=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A learned shortcut only where the channel count changes (as in DDPM / LDM).
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb=None):
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # one shift per channel
        h = self.conv2(self.norm2(h))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))  # h first: see the docstring


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `padding=0` is the VAE's variant: pad one pixel right and bottom only (LDM quirk)."""

    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `size`, when a skip connection has an odd size) then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
