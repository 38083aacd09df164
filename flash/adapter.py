"""T2I-Adapter (Mou et al. 2023, arXiv 2302.08453): a small convolutional network that turns a condition image
(edges, sketch, depth, ...) into one feature map per UNet down level; the frozen UNet adds them to its down
path (flash/unet.py, `adapter_residuals`). Module names equal diffusers' `T2IAdapter` checkpoint keys
(`adapter.conv_in.weight`, `adapter.body.1.in_conv.weight`, `adapter.body.1.resnets.0.block1.weight`, ...), so
the released adapters (TencentARC t2iadapter_*_sd15v2, t2i-adapter-*-sdxl-1.0) load with no renaming.

    condition image (B, c, H, W) in [0, 1]
      -> PixelUnshuffle(f): (B, c*f*f, H/f, W/f)    f = 8 (SD1.5, = the VAE factor) or 16 (XL)
      -> conv_in 3x3 -> levels: [AvgPool 2x2] -> [1x1 conv to the level's width] -> n x (conv3x3, ReLU, conv1x1, + x)
      -> one feature per level, at the resolution and width of the UNet level it is added to

`full_adapter` halves the resolution at every level after the first (SD1.x: 64/32/16/8 for a 512 image);
`full_adapter_xl` at the third level only (SDXL's three down levels plus its mid block). The light adapter
is not implemented (a ValueError names it).
"""
from dataclasses import dataclass

import torch.nn as nn

from flash.config_check import checked_kwargs
from flash.io import read_json


class AdapterResnetBlock(nn.Module):
    """conv1x1(relu(conv3x3(x))) + x."""

    def __init__(self, channels):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.block2(self.act(self.block1(x))) + x


class AdapterBlock(nn.Module):
    """One level: [AvgPool 2x2] -> [1x1 conv where the width changes] -> num_res_blocks resnets."""

    def __init__(self, *, in_channels, out_channels, num_res_blocks, downsample):
        super().__init__()
        # ceil_mode: an odd side rounds up, as the UNet's stride-2 convs with padding 1 do
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if downsample else None
        self.in_conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.resnets = nn.Sequential(*[AdapterResnetBlock(out_channels) for _ in range(num_res_blocks)])

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class FullAdapter(nn.Module):
    """PixelUnshuffle -> conv_in -> one AdapterBlock per UNet down level, each output kept as a feature."""

    def __init__(self, cfg):
        super().__init__()
        ch, n = list(cfg.channels), cfg.num_res_blocks
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.downscale_factor ** 2, ch[0], 3, padding=1)
        if cfg.adapter_type == "full_adapter":        # down at every level but the first
            downs = [i > 0 for i in range(len(ch))]
        else:                                         # full_adapter_xl: down at the third level only
            downs = [i == 2 for i in range(len(ch))]
        self.body = nn.ModuleList([AdapterBlock(in_channels=ch[max(i - 1, 0)], out_channels=ch[i], num_res_blocks=n,
                                                downsample=downs[i]) for i in range(len(ch))])

    def forward(self, x):
        x = self.conv_in(self.unshuffle(x))
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    """diffusers' T2IAdapter: the full adapter under the `adapter.` prefix of its checkpoint keys."""

    def __init__(self, cfg: "AdapterConfig"):
        super().__init__()
        self.config = cfg
        self.adapter = FullAdapter(cfg)

    @property
    def total_downscale_factor(self):
        """Condition-image pixels per pixel of the coarsest feature (64 for SD1.x: 512 -> 8)."""
        c = self.config
        halvings = len(c.channels) - 1 if c.adapter_type == "full_adapter" else 1
        return c.downscale_factor * 2 ** halvings

    def forward(self, image, scale=1.0):
        """image (B, in_channels, H, W) in [0, 1] -> list of features, each times `scale` (diffusers'
        adapter_conditioning_scale)."""
        if image.shape[1] != self.config.in_channels:
            raise ValueError(f"this adapter takes {self.config.in_channels}-channel condition images, "
                             f"got {image.shape[1]} channels")
        f = self.config.downscale_factor
        if image.shape[-1] % f or image.shape[-2] % f:
            raise ValueError(f"adapter condition image sides must be multiples of {f}, got {tuple(image.shape[-2:])}")
        dtype = self.adapter.conv_in.weight.dtype
        return [feature * scale if scale != 1 else feature for feature in self.adapter(image.to(dtype))]


# ----------------------------------------------------------------------------- config

@dataclass
class AdapterConfig:
    """diffusers' T2IAdapter config fields."""
    in_channels: int = 3                        # 1 for the canny / sketch adapters, 3 for depth, pose, ...
    channels: tuple = (320, 640, 1280, 1280)    # the UNet's block_out_channels
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    @classmethod
    def from_config_json(cls, config, source="adapter config"):
        """A diffusers config.json (a dict, or a path to the file). Unknown keys are ignored."""
        if not isinstance(config, dict):
            source = str(config)
            config = read_json(config, "adapter config")
        cfg = cls(**checked_kwargs(cls, config, source))
        if cfg.adapter_type not in ("full_adapter", "full_adapter_xl"):
            raise ValueError(f"{source}: adapter_type={cfg.adapter_type!r} is not supported "
                             "(full_adapter, full_adapter_xl)")
        return cfg
