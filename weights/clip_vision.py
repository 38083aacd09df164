"""Load a CLIP image tower into flash.clip_vision.CLIPVisionModel from a transformers folder or an open_clip
safetensors file.

- transformers: a `CLIPVisionModelWithProjection` folder (our key tree already), or a full `CLIPModel` folder,
  of which only `vision_model.*` and `visual_projection.*` are read. config.json + model.safetensors,
  sharded or fp16 variant. Saves older than transformers 4.31 also hold the constant
  `vision_model.embeddings.position_ids` buffer: dropped.
- open_clip (`open_clip_model.safetensors`, e.g. LAION's ViT-g-14 and ViT-L-14): the `visual.*` keys are
  renamed by the ordered rules of OPEN_CLIP_RULES, the fused attention input projection is split into
  q / k / v, and `visual.proj` (C, P), applied as x @ proj, is transposed into a Linear weight (P, C). Such a
  file has no config: the shapes give every size except the head count and the activation. Heads default to
  OPEN_CLIP_HEADS by width (open_clip's head width is 64 unless its model config says otherwise: ViT-g-14
  uses 88); the activation defaults to GELU, which LAION's models use (OpenAI's own weights are quick-GELU:
  pass hidden_act="quick_gelu", or load them from a transformers folder, whose config says so).
`load_clip_text` reads the text side of the same two sources, for the CLIP score: a CLIPModel folder through
weights.text.load_text_encoder, or an open_clip file's top-level text keys (`token_embedding`,
`positional_embedding`, `transformer.resblocks.*`, `ln_final`, `text_projection`) by the same block rules,
into flash.clip.CLIPTextModel with its projection (heads: width / 64, open_clip's text default; GELU).
Pickle checkpoints (.bin, .pt, ...) are refused by flash.io.
"""
import math
import re
from pathlib import Path

import torch

from flash import clip
from flash.clip_vision import CLIPVisionModel, from_config_json
from flash.io import CheckpointError, find_weights, load_into, read_config, read_weights
from weights.text import load_text_encoder

ARCHITECTURES = ("CLIPVisionModelWithProjection", "CLIPModel")

# open_clip name -> our name, applied in order to the `visual.` keys (the prefix already removed).
OPEN_CLIP_RULES = [
    (r"^conv1\.", "embeddings.patch_embedding."),
    (r"^class_embedding$", "embeddings.class_embedding"),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^ln_pre\.", "pre_layrnorm."),
    (r"^ln_post\.", "post_layernorm."),
    (r"^transformer\.resblocks\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]

# open_clip widths whose model config sets a head width other than 64 (ViT-H/14: 80, ViT-g/14: 88, bigG: 104).
OPEN_CLIP_HEADS = {1280: 16, 1408: 16, 1664: 16}


def renamed(key, value, rules, tower):
    """One open_clip tensor of a tower -> [(our key, tensor)]: the ordered rules, then the fused attention input
    projection, one (3C, C) matrix in open_clip (nn.MultiheadAttention), split into three (C, C) ones."""
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    fused = re.match(r"(encoder\.layers\.\d+)\.attn\.in_proj_(weight|bias)$", key)
    if not fused:
        return [(f"{tower}.{key}", value)]
    return [(f"{tower}.{fused[1]}.self_attn.{name}.{fused[2]}", part.contiguous())
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0))]


def from_open_clip(state, source="checkpoint"):
    """open_clip `visual.*` tensors -> our vision keys (other keys, e.g. the text tower, are left out)."""
    out = {}
    for key, value in state.items():
        if not key.startswith("visual."):
            continue
        key = key[len("visual."):]
        if key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
            continue
        out.update(renamed(key, value, OPEN_CLIP_RULES, "vision_model"))
    if not out:
        raise CheckpointError(f"{source}: no `visual.*` keys: not an open_clip checkpoint with an image tower")
    return out


OPEN_CLIP_TEXT_RULES = [
    (r"^token_embedding\.", "embeddings.token_embedding."),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^ln_final\.", "final_layer_norm."),
] + OPEN_CLIP_RULES[5:]          # the blocks are named as in the image tower


def from_open_clip_text(state, source="checkpoint"):
    """open_clip's top-level text-tower tensors -> flash.clip.CLIPTextModel keys (with the projection)."""
    out = {}
    for key, value in state.items():
        if key.startswith("visual.") or key in ("logit_scale", "attn_mask"):
            continue
        if key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
            continue
        out.update(renamed(key, value, OPEN_CLIP_TEXT_RULES, "text_model"))
    needed = ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
              "text_model.encoder.layers.0.mlp.fc1.weight", "text_projection.weight")
    missing = [k for k in needed if k not in out]
    if missing:
        raise CheckpointError(f"{source}: not an open_clip checkpoint with a text tower (no {missing[0]})")
    width = out[needed[0]].shape[1]
    cfg = dict(vocab_size=out[needed[0]].shape[0], hidden_size=width, intermediate_size=out[needed[2]].shape[0],
               num_hidden_layers=len({k.split(".")[3] for k in out if k.startswith("text_model.encoder.layers.")}),
               num_attention_heads=max(width // 64, 1), max_position_embeddings=out[needed[1]].shape[0],
               hidden_act="gelu", eos_token_id=49407, projection_dim=out[needed[3]].shape[0],
               architectures=["CLIPTextModelWithProjection"])
    return out, cfg


def load_clip_text(path, dtype=torch.float32, num_attention_heads=None, hidden_act="gelu"):
    """The text tower of a CLIP (a transformers CLIPModel folder or an open_clip .safetensors file) ->
    flash.clip.CLIPTextModel whose `.pooled` output is the projected text embedding."""
    path = Path(path)
    if path.is_dir():
        return load_text_encoder(path, dtype)
    state, cfg = from_open_clip_text(read_weights(path), str(path))
    cfg.update(hidden_act=hidden_act, **({"num_attention_heads": num_attention_heads} if num_attention_heads else {}))
    try:
        config = clip.from_config_json(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    with torch.device("meta"):
        model = clip.CLIPTextModel(config)
    return load_into(model, state, source=str(path), dtype=dtype)


def open_clip_config(state, source="checkpoint", num_attention_heads=None, hidden_act="gelu"):
    """The tower's sizes read from the shapes of an open_clip state dict (our names, after from_open_clip)."""
    try:
        patch = state["vision_model.embeddings.patch_embedding.weight"]  # (C, 3, p, p)
        positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        fc1 = state["vision_model.encoder.layers.0.mlp.fc1.weight"]
        projection = state["visual_projection.weight"]
    except KeyError as e:
        raise CheckpointError(f"{source}: open_clip image tower without {e.args[0]} (after renaming)") from None
    width, grid = patch.shape[0], math.isqrt(max(positions - 1, 0))
    if grid * grid != positions - 1:
        raise CheckpointError(f"{source}: {positions - 1} position embeddings do not make a square grid of patches")
    heads = num_attention_heads or OPEN_CLIP_HEADS.get(width) or width // 64
    if heads == 0 or width % heads:
        raise CheckpointError(f"{source}: cannot infer the head count of width {width}; pass num_attention_heads")
    layers = len({k.split(".")[3] for k in state if k.startswith("vision_model.encoder.layers.")})
    cfg = dict(hidden_size=width, intermediate_size=fc1.shape[0], num_hidden_layers=layers,
               num_attention_heads=heads, image_size=grid * patch.shape[-1], patch_size=patch.shape[-1],
               projection_dim=projection.shape[0], hidden_act=hidden_act)
    try:
        return from_config_json(cfg)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def transformers_config(folder):
    config = read_config(folder)
    archs = config.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        raise CheckpointError(f"{folder / 'config.json'}: architectures {archs} is not a CLIP image tower "
                              f"(expected one of {', '.join(ARCHITECTURES)})")
    try:
        return from_config_json(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None


def load_image_encoder(path, dtype=torch.float32, variant=None, num_attention_heads=None, hidden_act="gelu"):
    """A transformers CLIP folder or an open_clip .safetensors file -> CLIPVisionModel in eval mode, whose
    `model(pixel_values)` equals transformers' CLIPVisionModelWithProjection(...).image_embeds.

    dtype: floating tensors are cast to it (None keeps the file's). variant="fp16" prefers `.fp16` files.
    num_attention_heads, hidden_act: for open_clip files only (their sizes come from shapes; see above)."""
    path = Path(path)
    if path.is_dir():
        cfg = transformers_config(path)
        weights_path = find_weights(path, "model", variant=variant)
        state = {k: v for k, v in read_weights(weights_path).items()
                 if k.startswith(("vision_model.", "visual_projection."))
                 and not k.endswith("embeddings.position_ids")}
    else:
        weights_path = path
        state = from_open_clip(read_weights(path), source=str(path))
        cfg = open_clip_config(state, str(path), num_attention_heads, hidden_act)
    with torch.device("meta"):
        model = CLIPVisionModel(cfg)
    return load_into(model, state, source=str(weights_path), dtype=dtype)
