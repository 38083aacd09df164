"""Load the SD3 / SD3.5 MMDiT (flash/mmdit.py) from a diffusers `transformer/` folder or a single-file
checkpoint in Stability's original layout.

The diffusers layout needs no renaming: the module tree equals its key tree, including the stored
positional table `pos_embed.pos_embed` (a persistent buffer upstream). The original layout (Stability's
`MMDiT` / `MMDiTX` of the sd3 reference code, as in sd3_medium.safetensors and the SD3.5 single files,
under `model.diffusion_model.`) differs by names, by fused `qkv` projections (q|k|v stacked along the
output dim) and by the order of two adaLN-Continuous projections: the last block's context modulation and
the final layer's give (shift, scale) there and (scale, shift) in diffusers. ORIGINAL_RULES maps it.
The config of a single file is read from its shapes (config_from_original); the head width cannot be
(without qk-norm), so it is SD3's 64 unless a config is given. Whole-pipeline single files (with the
text encoders and VAE) are read for their transformer only. A wrong, missing or extra key, a wrong
shape or an unsupported config value is a one-line CheckpointError naming it.
"""
import math
import re
from pathlib import Path

import torch

from flash.dit import sincos_pos_embed_2d
from flash.io import CheckpointError, find_weights, load_into, read_config, read_safetensors, read_weights
from flash.mmdit import CONFIGS, SD3Config, build

PREFIX = "model.diffusion_model."
# Ordered rules on the key with PREFIX removed: the first pattern matching the START of a key wins, and
# the rest of the key (".weight", ".bias") is appended to each target. Several targets split the tensor
# into equal chunks along dim 0, in order. "swap" marks (shift, scale) -> (scale, shift).
_X, _C = r"joint_blocks\.(\d+)\.x_block\.", r"joint_blocks\.(\d+)\.context_block\."
_B = r"transformer_blocks.\1."
ORIGINAL_RULES = [
    (r"pos_embed$", ["pos_embed.pos_embed"]),
    (r"x_embedder\.proj", ["pos_embed.proj"]),
    (r"t_embedder\.mlp\.0", ["time_text_embed.timestep_embedder.linear_1"]),
    (r"t_embedder\.mlp\.2", ["time_text_embed.timestep_embedder.linear_2"]),
    (r"y_embedder\.mlp\.0", ["time_text_embed.text_embedder.linear_1"]),
    (r"y_embedder\.mlp\.2", ["time_text_embed.text_embedder.linear_2"]),
    (r"context_embedder", ["context_embedder"]),
    (_X + r"attn\.qkv", [_B + "attn.to_q", _B + "attn.to_k", _B + "attn.to_v"]),
    (_X + r"attn\.proj", [_B + "attn.to_out.0"]),
    (_X + r"attn\.ln_q", [_B + "attn.norm_q"]),
    (_X + r"attn\.ln_k", [_B + "attn.norm_k"]),
    (_X + r"attn2\.qkv", [_B + "attn2.to_q", _B + "attn2.to_k", _B + "attn2.to_v"]),
    (_X + r"attn2\.proj", [_B + "attn2.to_out.0"]),
    (_X + r"attn2\.ln_q", [_B + "attn2.norm_q"]),
    (_X + r"attn2\.ln_k", [_B + "attn2.norm_k"]),
    (_X + r"adaLN_modulation\.1", [_B + "norm1.linear"]),
    (_X + r"mlp\.fc1", [_B + "ff.net.0.proj"]),
    (_X + r"mlp\.fc2", [_B + "ff.net.2"]),
    (_C + r"attn\.qkv", [_B + "attn.add_q_proj", _B + "attn.add_k_proj", _B + "attn.add_v_proj"]),
    (_C + r"attn\.proj", [_B + "attn.to_add_out"]),
    (_C + r"attn\.ln_q", [_B + "attn.norm_added_q"]),
    (_C + r"attn\.ln_k", [_B + "attn.norm_added_k"]),
    (_C + r"adaLN_modulation\.1", [_B + "norm1_context.linear"]),  # swapped in the last block
    (_C + r"mlp\.fc1", [_B + "ff_context.net.0.proj"]),
    (_C + r"mlp\.fc2", [_B + "ff_context.net.2"]),
    (r"final_layer\.adaLN_modulation\.1", ["norm_out.linear", "swap"]),
    (r"final_layer\.linear", ["proj_out"]),
]


def is_original_layout(state_dict):
    return any(k.startswith(("joint_blocks.", PREFIX + "joint_blocks.")) for k in state_dict)


def swap_halves(tensor):
    """(shift, scale) <-> (scale, shift) along dim 0 of an adaLN-Continuous projection."""
    a, b = tensor.chunk(2, dim=0)
    return torch.cat([b, a])


def convert_original(state_dict, source="checkpoint"):
    """Original MMDiT keys (with or without PREFIX; other components' keys of a whole-pipeline file are
    dropped) -> diffusers keys. Transformer keys no rule knows are kept, so load_into names them."""
    if any(k.startswith(PREFIX) for k in state_dict):
        state_dict = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    blocks = [int(m.group(1)) for k in state_dict for m in [re.match(r"joint_blocks\.(\d+)\.", k)] if m]
    last = max(blocks, default=-1)
    out = {}
    for key, tensor in state_dict.items():
        for pattern, targets in ORIGINAL_RULES:
            m = re.match(pattern, key)
            if m:
                break
        else:
            out[key] = tensor
            continue
        rest = key[m.end():]
        if targets[-1] == "swap" or (targets[0].endswith("norm1_context.linear") and int(m.group(1)) == last):
            out[m.expand(targets[0]) + rest] = swap_halves(tensor)
            continue
        if len(targets) > 1 and tensor.shape[0] % len(targets):
            raise CheckpointError(f"{source}: {PREFIX}{key} has {tensor.shape[0]} rows, not divisible into "
                                  f"{len(targets)} fused projections")
        # clone(): chunks would share one storage, which safetensors later refuses to save.
        chunks = [c.clone() for c in tensor.chunk(len(targets), dim=0)] if len(targets) > 1 else [tensor]
        for target, chunk in zip(targets, chunks):
            out[m.expand(target) + rest] = chunk
    return out


def config_from_original(state, head_dim=64, source="checkpoint"):
    """An SD3Config read from the shapes of a converted (diffusers-named) single-file state dict."""
    try:
        proj = state["pos_embed.proj.weight"]  # (C, in, p, p)
        n = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
        if "transformer_blocks.0.attn.norm_q.weight" in state:
            head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        table = state.get("pos_embed.pos_embed")
        return SD3Config(
            patch_size=proj.shape[-1], in_channels=proj.shape[1], num_layers=n, attention_head_dim=head_dim,
            num_attention_heads=proj.shape[0] // head_dim,
            joint_attention_dim=state["context_embedder.weight"].shape[1],
            caption_projection_dim=state["context_embedder.weight"].shape[0],
            pooled_projection_dim=state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
            out_channels=state["proj_out.weight"].shape[0] // proj.shape[-1] ** 2,
            pos_embed_max_size=math.isqrt(table.shape[1]) if table is not None else 192,
            dual_attention_layers=tuple(i for i in range(n) if f"transformer_blocks.{i}.attn2.to_q.weight" in state),
            qk_norm="rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in state else None)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: not an SD3 / SD3.5 transformer ({type(e).__name__}: {e}); "
                              f"pass config= for a custom architecture") from None


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
    [.fp16].safetensors, possibly sharded), a pipeline folder holding one, or a single .safetensors file
    (original layout, see the module docstring; or diffusers keys with a config.json beside it). `config` (a preset name of
    flash.mmdit.CONFIGS, an SD3Config or a dict) replaces the folder's config.json. Built on the meta
    device and filled by assignment (one copy of the weights); returned in eval mode."""
    path = Path(path)
    if not path.is_dir():
        return load_single_file(path, dtype, config)
    if not (path / "config.json").is_file() and (path / "transformer").is_dir():
        path = path / "transformer"  # a whole pipeline folder
    if config is None:
        config = read_config(path)  # a missing or malformed config.json -> CheckpointError naming it
    cfg = mmdit_config(config, str(path / "config.json"))
    file = find_weights(path, "diffusion_pytorch_model", variant)
    return load_into(build(cfg, device="meta"), read_weights(file), source=str(file), dtype=dtype)


def load_single_file(path, dtype=torch.float32, config=None):
    """The transformer of a single .safetensors file (pickles refused by read_safetensors)."""
    state = read_safetensors(path)
    if not is_original_layout(state):
        if config is None and (path.parent / "config.json").is_file():
            config = read_config(path.parent)
        if config is None:
            raise CheckpointError(f"{path}: diffusers-named SD3 weights need a config (a config.json beside the "
                                  f"file, or config=)")
        return load_into(build(mmdit_config(config, str(path)), device="meta"), state, source=str(path), dtype=dtype)
    state = convert_original(state, str(path))
    cfg = config_from_original(state, source=str(path)) if config is None else mmdit_config(config, str(path))
    if "pos_embed.pos_embed" not in state:  # some exports leave the fixed table out: it is recomputed
        m = cfg.pos_embed_max_size
        state["pos_embed.pos_embed"] = sincos_pos_embed_2d(cfg.inner_dim, m, m, cfg.sample_size // cfg.patch_size,
                                                           1.0)[None]
    return load_into(build(cfg, device="meta"), state, source=str(path), dtype=dtype)
