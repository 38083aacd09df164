"""AutoencoderKL: the Stable Diffusion VAE (image <-> latent, f = 8), with diffusers' checkpoint key names.

Follows Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3 and
App. G) as released in CompVis/latent-diffusion and as laid out by diffusers' `AutoencoderKL`: the module tree
equals the keys of a diffusers `vae/` folder (encoder.down_blocks.*, encoder.mid_block.*, quant_conv, ...).

    encode: x (B, 3, H, W) -> conv_in -> [resnets, downsample] x levels -> mid (resnet, attention, resnet)
            -> GroupNorm+SiLU -> conv_out -> quant_conv -> (mean, logvar), each (B, 4, H/8, W/8)
    decode: z -> post_quant_conv -> conv_in -> mid -> [resnets, upsample] x levels -> GroupNorm+SiLU -> conv_out

Like diffusers, `encode` / `decode` work on raw latents; the scaling factor (0.18215 SD1.5, 0.13025 SDXL) and
the optional shift are applied by `scale_latents` / `unscale_latents` (the pipeline's job).
Deviations: no slicing; tiled decode keeps only one previous row of decoded tiles (same blending result as
diffusers' `tiled_decode`); the encoder is never tiled. `force_upcast` (the SDXL VAE overflows in fp16) is
honoured by keeping the weights in fp32 and casting inputs up and outputs back.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from flash.config_check import checked_kwargs
from flash.io import read_json
from flash.layers import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the H*W positions, with a GroupNorm in front and a residual
    (the VAE's mid-block attention). Keys: group_norm, to_q, to_k, to_v, to_out.0."""

    def __init__(self, channels, *, groups, eps=1e-6):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = GroupNorm(groups, channels, eps=eps)

    def forward(self, x):
        # Views as in diffusers, not einops' copies, and f(x) + x: layout matters (flash/layers.py).
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)              # (B, H*W, C)
        out = super().forward(tokens).transpose(1, 2).reshape(b, c, h, w)   # channels-last strides
        return out + x


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels, *, groups, add_attention=True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups=groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups=groups)]) if add_attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    """num_layers resnets, then an optional stride-2 conv (the VAE's right/bottom-padded variant)."""

    def __init__(self, *, in_channels, out_channels, num_layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                    groups=groups) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nn.Module):
    """num_layers resnets, then an optional nearest x2 upsample and conv."""

    def __init__(self, *, in_channels, out_channels, num_layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                    groups=groups) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(in_channels=ch[max(i - 1, 0)], out_channels=ch[i], num_layers=cfg.layers_per_block,
                         groups=g, downsample=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], groups=g, add_attention=cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=1e-6, silu=True)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups=g, add_attention=cfg.mid_block_add_attention)
        # up_blocks[0] works at the lowest resolution; one more resnet per level than the encoder.
        self.up_blocks = nn.ModuleList([
            DecoderBlock(in_channels=ch[max(i - 1, 0)], out_channels=ch[i], num_layers=cfg.layers_per_block + 1,
                         groups=g, upsample=i < n - 1) for i in range(n)])
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=1e-6, silu=True)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)), per latent element."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in LDM / diffusers, so exp() cannot overflow or give a zero std.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        # Noise is drawn on the generator's device, then moved: a CPU generator gives the same z everywhere.
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    """Encoder, decoder and the 1x1 convs around the latent; see the module docstring."""

    def __init__(self, cfg: "VAEConfig"):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        self.use_tiling = False
        self.tile_overlap = 0.25   # fraction of a tile shared with its neighbour (diffusers' tile_overlap_factor)

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    @property
    def latent_tile(self):
        """Default latent tile side: the training image size over the downsampling factor (64 for SD)."""
        side = self.config.sample_size
        side = side[0] if isinstance(side, (list, tuple)) else side
        return side // 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x):
        """Image in [-1, 1], (B, 3, H, W) -> DiagonalGaussian over (B, 4, H/8, W/8) raw latents."""
        moments = self.encoder(x.to(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments.to(x.dtype))

    def decode(self, z):
        """Raw latents (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        if self.use_tiling and max(z.shape[-2:]) > self.latent_tile:
            return self.tiled_decode(z)
        return self._decode(z.to(self.dtype)).to(z.dtype)

    def _decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def tiled_decode(self, z, tile=None, overlap=None):
        """Decode overlapping latent tiles one at a time and cross-fade the overlaps linearly, so activation
        memory depends on the tile size, not on the image size. Same result as diffusers' tiled_decode."""
        tile = tile or self.latent_tile
        overlap = self.tile_overlap if overlap is None else overlap
        f = 2 ** (len(self.config.block_out_channels) - 1)
        stride = int(tile * (1 - overlap))          # latent step between tile origins
        blend = int(tile * f * overlap)             # pixels cross-faded at each seam
        keep = tile * f - blend                     # pixels each tile contributes
        rows, above = [], None
        for i in range(0, z.shape[2], stride):
            row = []
            for j in range(0, z.shape[3], stride):
                t = self._decode(z[:, :, i:i + tile, j:j + tile].to(self.dtype))
                if above is not None:
                    t = _blend(above[len(row)], t, blend, dim=2)
                if row:
                    t = _blend(row[-1], t, blend, dim=3)
                row.append(t)   # kept blended: the next tile fades from this one
            rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
            above = row
        return torch.cat(rows, dim=2).to(z.dtype)

    def scale_latents(self, z):
        """Raw VAE latents -> the diffusion model's latent space (unit variance, roughly)."""
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def unscale_latents(self, z):
        shift = self.config.shift_factor or 0.0
        return z / self.config.scaling_factor + shift


def _blend(prev, cur, n, dim):
    """Linear cross-fade of `cur`'s first n rows (dim=2) or columns (dim=3) from `prev`'s last n, in place
    (`cur` is a freshly decoded tile)."""
    n = min(prev.shape[dim], cur.shape[dim], n)
    if n == 0:
        return cur
    w = torch.arange(n, dtype=cur.dtype, device=cur.device) / n                 # weight of the current tile
    w = w.view(-1, 1) if dim == 2 else w
    head, tail = cur.narrow(dim, 0, n), prev.narrow(dim, prev.shape[dim] - n, n)
    head.copy_(tail * (1 - w) + head * w)
    return cur


# ----------------------------------------------------------------------------- config

@dataclass
class VAEConfig:
    """diffusers' AutoencoderKL config fields (those that change the network or its use)."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512          # image side the VAE was trained at; sets the default decode tile
    scaling_factor: float = 0.18215
    shift_factor: float = None      # None for SD1.5 / SDXL (used by later VAEs)
    force_upcast: bool = True       # diffusers' default; True means "run this VAE in fp32"
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_config_json(cls, config, source="vae config"):
        """A diffusers config.json (a dict, or a path to the file). Unknown keys are ignored."""
        if not isinstance(config, dict):
            source = str(config)
            config = read_json(config, "vae config")
        kwargs = checked_kwargs(cls, config, source)
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"{source}: act_fn={config['act_fn']!r} is not supported (only 'silu')")
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise ValueError(f"{source}: {key} is not supported (per-channel latent statistics)")
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    def validate(self, source="vae config"):
        """Raise a ValueError naming the field if this config is not one the model can build."""
        n = len(self.block_out_channels)
        if tuple(self.down_block_types) != ("DownEncoderBlock2D",) * n or tuple(self.up_block_types) != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"{source}: down/up_block_types must be {n} DownEncoderBlock2D / UpDecoderBlock2D, "
                             f"got {list(self.down_block_types)} / {list(self.up_block_types)}")
        if not isinstance(self.layers_per_block, int):
            raise ValueError(f"{source}: layers_per_block must be one int, got {self.layers_per_block!r}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"{source}: block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")


CONFIGS = {
    # SD1.x / SD2.x / PixArt VAE. Its released config has no force_upcast key (diffusers then says True), but it
    # runs fine in fp16, so the preset lets it.
    "sd": VAEConfig(sample_size=512, scaling_factor=0.18215, force_upcast=False),
    "sdxl": VAEConfig(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
}
