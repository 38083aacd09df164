"""Text -> conditioning -> sampler -> VAE decode -> images, for each family (SD1.5/SD2, SDXL, PixArt).

`Pipeline` holds the loaded components; `weights.load_pipeline(path)` builds one from a diffusers pipeline
folder or a single-file checkpoint.
"""
from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class Pipeline:
    family: str                      # "sd15" | "sd2" | "sdxl" | "pixart" (sd-inpaint variants keep their base family)
    vae: nn.Module
    text_encoders: list              # [clip] for SD1.x/2.x, [clip-L, bigG-with-projection] for SDXL, [t5] for PixArt
    tokenizers: list                 # same order as text_encoders
    scheduler_config: dict = field(default_factory=dict)  # diffusers scheduler_config.json contents
    unet: nn.Module = None           # SD families
    transformer: nn.Module = None    # PixArt

    @property
    def denoiser(self):
        return self.unet if self.unet is not None else self.transformer
