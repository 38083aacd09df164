"""AutoencoderTiny (TAESD): a 1.2M-parameter distilled decoder (and encoder) for SD / SDXL / SD3 latents.

Follows Ollin Boer Bohan's TAESD (madebyollin/taesd) as laid out by diffusers' `AutoencoderTiny`, so the
module tree equals the keys of a diffusers `AutoencoderTiny` folder (taesd, taesdxl, taesd3):

    decode: z -> 3 tanh(z / 3) -> conv, ReLU -> [blocks x n_i, (x2 nearest, conv)] per stage -> conv -> [0, 1]
    encode: image [0, 1] -> conv -> [(stride-2 conv), blocks x n_i] per stage -> conv -> latent
    block:  ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x))     (skip = 1x1 conv when channels change)

It replaces the full VAE decoder where speed matters more than the last detail: on a 512x512 SD1.5 image
its decoder costs about 1/20 of AutoencoderKL's. Like diffusers, `decode` returns images in [-1, 1] and
`encode` takes them, so it drops into flash.pipeline.decode unchanged. The latents it decodes are
`latents / scaling_factor + shift_factor` of the diffusion model's latents, with its own config's values:
taesd / taesdxl were trained on the scaled latents (scaling 1.0, no shift); taesd3 says its own factors.
Deviations: no tiling or slicing; no `latent_magnitude` / `latent_shift` helpers (they only serve TAESD's
training-time 8-bit latent storage).
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Three 3x3 convs with ReLUs, a skip, and a ReLU after the sum. Keys: conv.{0,2,4}, skip (if any)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Module):
    """Image in [0, 1] -> latent, f = 2 ** (stages - 1). Keys: layers.N (one flat Sequential)."""

    def __init__(self, cfg):
        super().__init__()
        ch = cfg.encoder_block_out_channels
        layers = []
        for i, n in enumerate(cfg.num_encoder_blocks):
            # the first stage keeps the resolution; each later one halves it with a bias-free stride-2 conv
            layers.append(nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1) if i == 0 else
                          nn.Conv2d(ch[i], ch[i], 3, padding=1, stride=2, bias=False))
            layers += [Block(ch[i], ch[i]) for _ in range(n)]
        layers.append(nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class TinyDecoder(nn.Module):
    """Latent -> image in [0, 1]. Keys: layers.N (one flat Sequential; ReLU and Upsample hold no weights)."""

    def __init__(self, cfg):
        super().__init__()
        ch, last = cfg.decoder_block_out_channels, len(cfg.num_decoder_blocks) - 1
        layers = [nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1), nn.ReLU()]
        for i, n in enumerate(cfg.num_decoder_blocks):
            layers += [Block(ch[i], ch[i]) for _ in range(n)]
            if i < last:    # x2, then a bias-free conv
                layers.append(nn.Upsample(scale_factor=cfg.upsampling_scaling_factor, mode=cfg.upsample_fn))
            layers.append(nn.Conv2d(ch[i], ch[i], 3, padding=1, bias=False) if i < last else
                          nn.Conv2d(ch[i], cfg.out_channels, 3, padding=1))       # the last: to RGB, with bias
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        # A soft clamp to (-3, 3): TAESD was trained on latents in that range.
        return self.layers(torch.tanh(z / 3) * 3)


class AutoencoderTiny(nn.Module):
    """TAESD's encoder and decoder with the AutoencoderKL interface flash.pipeline uses (decode, config,
    unscale_latents, dtype)."""

    def __init__(self, cfg: "TinyVAEConfig"):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = TinyEncoder(cfg)
        self.decoder = TinyDecoder(cfg)

    @property
    def dtype(self):
        return self.decoder.layers[0].weight.dtype

    def encode(self, x):
        """Image in [-1, 1] (B, 3, H, W) -> latents (B, C, H/f, W/f) (TAESD's encoder is deterministic)."""
        return self.encoder((x.to(self.dtype) + 1) / 2).to(x.dtype)

    def decode(self, z):
        """Latents (B, C, h, w) -> image (B, 3, f h, f w) in [-1, 1]."""
        return (self.decoder(z.to(self.dtype)) * 2 - 1).to(z.dtype)

    def scale_latents(self, z):
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z):
        return z / self.config.scaling_factor + self.config.shift_factor


@dataclass
class TinyVAEConfig:
    """diffusers' AutoencoderTiny config fields (those that change the network or its use)."""
    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple = (64, 64, 64, 64)
    decoder_block_out_channels: tuple = (64, 64, 64, 64)
    num_encoder_blocks: tuple = (1, 3, 3, 3)
    num_decoder_blocks: tuple = (3, 3, 3, 1)
    latent_channels: int = 4            # 16 for taesd3
    upsampling_scaling_factor: int = 2
    upsample_fn: str = "nearest"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    force_upcast: bool = False          # TAESD runs in any dtype

    @property
    def block_out_channels(self):
        """The decoder's widths: their count sets the pipeline's pixels per latent (2 ** (count - 1))."""
        return self.decoder_block_out_channels

    @classmethod
    def from_config_json(cls, config, source="AutoencoderTiny config"):
        """A diffusers config.json dict. Unknown keys are ignored; null factors take the defaults."""
        if config.get("act_fn", "relu") != "relu":
            raise ValueError(f"{source}: act_fn={config['act_fn']!r} is not supported (only 'relu')")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names and v is not None}
        cfg = cls(**kw)
        cfg.validate(source)
        return cfg

    def validate(self, source="AutoencoderTiny config"):
        for side in ("encoder", "decoder"):
            widths, counts = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if len(widths) != len(counts):
                raise ValueError(f"{source}: {side}_block_out_channels has {len(widths)} entries, "
                                 f"num_{side}_blocks {len(counts)}; they must match")
            # diffusers sizes each stage's resampling conv from that stage's width alone, so only equal
            # widths make a network that runs (every released TAESD is 64 wide throughout)
            if len(set(widths)) != 1:
                raise ValueError(f"{source}: {side}_block_out_channels must all be equal, got {list(widths)}")
        if self.upsample_fn not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"{source}: upsample_fn={self.upsample_fn!r} is not nearest, bilinear or bicubic")
        if not self.scaling_factor:
            raise ValueError(f"{source}: scaling_factor must be non-zero")
