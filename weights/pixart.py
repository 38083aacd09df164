"""Load the PixArt-alpha transformer (flash/dit.py) from a diffusers `transformer/` folder or from the
original PixArt key layout given as a safetensors file.

The diffusers layout needs no renaming: the module tree equals its key tree. The original layout
(PixArt-alpha's own `PixArt` / `PixArtMS` classes) differs by names and by two fused projections: the
self-attention `attn.qkv` (q|k|v stacked along the output dim) and the cross-attention `cross_attn.kv_linear`
(k|v). ORIGINAL_RULES below maps it in a few ordered rules. The original release is a pickle `.pth`,
which is refused: convert it once with
`safetensors.torch.save_file(torch.load(path, weights_only=True)["state_dict"], ...)`
on a machine where unpickling it is acceptable.
"""
import math
import re
from dataclasses import replace
from pathlib import Path

import torch

from flash.dit import CONFIGS, PixArtConfig, build
from flash.io import CheckpointError, find_weights, load_into, read_config, read_safetensors, read_weights

# Ordered rules: the first pattern matching the START of a key wins, and the rest of the key (".weight",
# ".bias" or nothing) is appended to each target. One target renames; several split the tensor into equal
# chunks along dim 0, in order (PixArt fuses q|k|v and k|v into single Linear layers).
ORIGINAL_RULES = [
    (r"x_embedder\.proj", ["pos_embed.proj"]),
    (r"y_embedder\.y_proj\.fc(\d)", [r"caption_projection.linear_\1"]),
    (r"t_embedder\.mlp\.0", ["adaln_single.emb.timestep_embedder.linear_1"]),
    (r"t_embedder\.mlp\.2", ["adaln_single.emb.timestep_embedder.linear_2"]),
    (r"csize_embedder\.mlp\.0", ["adaln_single.emb.resolution_embedder.linear_1"]),
    (r"csize_embedder\.mlp\.2", ["adaln_single.emb.resolution_embedder.linear_2"]),
    (r"ar_embedder\.mlp\.0", ["adaln_single.emb.aspect_ratio_embedder.linear_1"]),
    (r"ar_embedder\.mlp\.2", ["adaln_single.emb.aspect_ratio_embedder.linear_2"]),
    (r"t_block\.1", ["adaln_single.linear"]),
    (r"blocks\.(\d+)\.attn\.qkv", [r"transformer_blocks.\1.attn1.to_q", r"transformer_blocks.\1.attn1.to_k",
                                   r"transformer_blocks.\1.attn1.to_v"]),
    (r"blocks\.(\d+)\.attn\.proj", [r"transformer_blocks.\1.attn1.to_out.0"]),
    (r"blocks\.(\d+)\.cross_attn\.q_linear", [r"transformer_blocks.\1.attn2.to_q"]),
    (r"blocks\.(\d+)\.cross_attn\.kv_linear", [r"transformer_blocks.\1.attn2.to_k",
                                              r"transformer_blocks.\1.attn2.to_v"]),
    (r"blocks\.(\d+)\.cross_attn\.proj", [r"transformer_blocks.\1.attn2.to_out.0"]),
    (r"blocks\.(\d+)\.mlp\.fc1", [r"transformer_blocks.\1.ff.net.0.proj"]),
    (r"blocks\.(\d+)\.mlp\.fc2", [r"transformer_blocks.\1.ff.net.2"]),
    (r"blocks\.(\d+)\.", [r"transformer_blocks.\1."]),  # scale_shift_table
    (r"final_layer\.linear", ["proj_out"]),
    (r"final_layer\.", [""]),  # scale_shift_table
]
# Keys of the original layout with no counterpart: the positional table (a persistent buffer there; it is
# recomputed here) and the learned null caption used for caption dropout in training (diffusers' pipeline,
# and this project, encode "" for the unconditional branch instead).
ORIGINAL_DROPPED = ("pos_embed", "y_embedder.y_embedding")


def convert_original(state_dict, source="checkpoint"):
    """Original PixArt keys -> diffusers keys. Keys no rule knows are kept, so load_into names them."""
    out = {}
    for key, tensor in state_dict.items():
        if key in ORIGINAL_DROPPED:
            continue
        for pattern, targets in ORIGINAL_RULES:
            m = re.match(pattern, key)
            if m:
                break
        else:
            out[key] = tensor
            continue
        rest = key[m.end():]
        if len(targets) > 1 and tensor.shape[0] % len(targets):
            raise CheckpointError(f"{source}: {key} has {tensor.shape[0]} rows, not divisible into "
                                  f"{len(targets)} fused projections")
        # clone(): chunks would share one storage, which safetensors later refuses to save.
        chunks = tensor.chunk(len(targets), dim=0) if len(targets) > 1 else (tensor,)
        for target, chunk in zip(targets, chunks):
            out[m.expand(target) + rest] = chunk.clone() if len(targets) > 1 else chunk
    return out


def is_original_layout(state_dict):
    return any(k.startswith(("x_embedder.", "blocks.", "t_block.")) for k in state_dict)


def config_from_original(state_dict):
    """Guess the config of an original-layout state dict: the 1024-MS preset if it has the size embedders,
    else the 512 one; sample_size from the stored positional table when present. Custom architectures
    should pass `config=` instead."""
    cfg = CONFIGS["pixart-xl-2-1024-ms" if "csize_embedder.mlp.0.weight" in state_dict else "pixart-xl-2-512"]
    if "pos_embed" in state_dict:
        side = math.isqrt(state_dict["pos_embed"].shape[1]) * cfg.patch_size
        # PixArt's own rule ("lewei scale"): 0.5 at 256 px, 1 at 512, 2 at 1024 (= diffusers' default at 512/1024).
        cfg = replace(cfg, sample_size=side, interpolation_scale=side / 64)
    return cfg


def _resolve_config(config, source):
    if isinstance(config, PixArtConfig):
        return config
    if isinstance(config, str):
        if config not in CONFIGS:
            raise CheckpointError(f"{source}: unknown PixArt preset {config!r}; known: {', '.join(CONFIGS)}")
        return CONFIGS[config]
    try:
        return PixArtConfig.from_config_json(config)  # dict or path to a config.json
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_transformer(path, dtype=torch.float32, variant=None, config=None):
    """PixArtTransformer2DModel from
    - a diffusers `transformer/` folder (config.json + diffusion_pytorch_model[.fp16].safetensors, possibly
      sharded), or a pipeline folder holding one;
    - a single .safetensors file in the original PixArt layout (or the diffusers one). `config` is then a
      preset name from flash.dit.CONFIGS, a PixArtConfig, or a config dict / config.json path; without
      it, config_from_original() guesses from the keys.
    Built on the meta device and filled by assignment (one copy of the weights); returned in eval mode.
    """
    path = Path(path)
    if not path.is_dir():
        state_dict = read_safetensors(path)  # refuses pickles with a conversion hint
        original = is_original_layout(state_dict)
        if config is None and not original and (path.parent / "config.json").is_file():
            config = path.parent / "config.json"
        if config is None:
            config = config_from_original(state_dict) if original else CONFIGS["pixart-xl-2-1024-ms"]
        if original:
            state_dict = convert_original(state_dict, source=str(path))
        model = build(_resolve_config(config, str(path)), device="meta")
        return load_into(model, state_dict, source=str(path), dtype=dtype)

    if not (path / "config.json").is_file() and (path / "transformer").is_dir():
        path = path / "transformer"  # a whole pipeline folder
    read_config(path)  # a missing or malformed config.json -> CheckpointError naming it
    cfg = _resolve_config(path / "config.json" if config is None else config, str(path))
    file = find_weights(path, "diffusion_pytorch_model", variant)
    model = build(cfg, device="meta")
    return load_into(model, read_weights(file), source=str(file), dtype=dtype)
