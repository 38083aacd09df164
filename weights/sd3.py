"""Load the SD3 / SD3.5 MMDiT (flash/mmdit.py) from a diffusers `transformer/` folder.

The diffusers layout needs no renaming: the module tree equals its key tree, including the stored
positional table `pos_embed.pos_embed` (a persistent buffer upstream). A wrong, missing or extra key, a
wrong shape or an unsupported config value is a one-line CheckpointError naming it (flash.io.load_into,
SD3Config.from_config_json).
"""
from pathlib import Path

import torch

from flash.io import CheckpointError, find_weights, load_into, read_config, read_weights
from flash.mmdit import CONFIGS, SD3Config, build


def mmdit_config(config, source):
    """An SD3Config from a preset name, an SD3Config, or a config dict / config.json path."""
    if isinstance(config, SD3Config):
        return config
    if isinstance(config, str) and config in CONFIGS:
        return CONFIGS[config]
    try:
        return SD3Config.from_config_json(config, name=source if isinstance(config, dict) else None)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_mmdit(path, dtype=torch.float32, variant=None, config=None):
    """SD3Transformer2DModel from a diffusers `transformer/` folder (config.json + diffusion_pytorch_model
    [.fp16].safetensors, possibly sharded) or a pipeline folder holding one. `config` (a preset name of
    flash.mmdit.CONFIGS, an SD3Config or a dict) replaces the folder's config.json. Built on the meta
    device and filled by assignment (one copy of the weights); returned in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "transformer").is_dir():
        path = path / "transformer"  # a whole pipeline folder
    if config is None:
        config = read_config(path)  # a missing or malformed config.json -> CheckpointError naming it
    cfg = mmdit_config(config, str(path / "config.json"))
    file = find_weights(path, "diffusion_pytorch_model", variant)
    return load_into(build(cfg, device="meta"), read_weights(file), source=str(file), dtype=dtype)
