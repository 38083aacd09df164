"""Load a transformers text-encoder folder (`config.json` + `model.safetensors`, sharded, or `.fp16` variant)
into flash.clip.CLIPTextModel or flash.t5.T5EncoderModel.

The model is built on the meta device and the tensors read from the file become its parameters
(flash.io.load_into, strict). Our module trees equal the checkpoint key trees, so the only conversion is
a few explicit rules for how transformers' saves differ between versions:
- CLIP: transformers >= 5 saves CLIPTextModel without the `text_model.` wrapper (`embeddings.*`), while
  transformers 4 saves (every released SD checkpoint) and CLIPTextModelWithProjection keep it: add it.
- CLIP: transformers < 4.31 persisted the constant `text_model.embeddings.position_ids` buffer: drop it.
- CLIPModel (a whole CLIP, as `eval.py --coco --clip` takes): its text side is `text_config` plus the
  top-level `projection_dim`, built as CLIPTextModelWithProjection; the vision keys are left out.
- T5: `encoder.embed_tokens` is tied to `shared`; safetensors saves keep only one of the two names
  (transformers 5 keeps `shared.weight`): fill the other from it.
"""
from pathlib import Path

import torch

from flash import clip, t5
from flash.io import CheckpointError, find_weights, load_into, read_config, read_weights

ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "CLIPModel")


def clip_keys(state):
    """transformers-version quirks of CLIP text checkpoints -> our key tree (see the module docstring)."""
    out = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value
    return out


def t5_keys(state, source):
    """Fill the tied pair `shared.weight` / `encoder.embed_tokens.weight` from whichever the file holds."""
    state = dict(state)
    a, b = "shared.weight", "encoder.embed_tokens.weight"
    if a in state and b in state:
        if state[a].shape == state[b].shape and not torch.equal(state[a], state[b]):
            raise CheckpointError(f"{source}: {a} and {b} differ, but T5EncoderModel ties them")
    elif a in state:
        state[b] = state[a]
    elif b in state:
        state[a] = state[b]
    return state


def build_text_encoder(config_dict, source="config.json"):
    """config.json dict -> model on the meta device. Raises CheckpointError naming `source` if unsupported."""
    archs = config_dict.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(f"{source}: architectures {archs} is not a supported text encoder "
                              f"(expected one of {', '.join(ARCHITECTURES)})")
    if arch == "CLIPModel":   # the text side of a whole CLIP: its projection is the joint-space embedding
        text_config = config_dict.get("text_config") or {}
        if not isinstance(text_config, dict):
            raise CheckpointError(f"{source}: text_config must be a JSON object")
        config_dict = {**text_config, "projection_dim": config_dict.get("projection_dim", 512),
                       "architectures": ["CLIPTextModelWithProjection"]}
    try:
        if arch == "T5EncoderModel":
            cfg = t5.from_config_json(config_dict)
        else:
            cfg = clip.from_config_json(config_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    with torch.device("meta"):
        model = t5.T5EncoderModel(cfg) if arch == "T5EncoderModel" else clip.CLIPTextModel(cfg)
    return model


def load_text_encoder(folder, dtype=torch.float32, variant=None):
    """A transformers text-encoder folder -> CLIPTextModel or T5EncoderModel in eval mode.

    dtype: floating tensors are cast to it (None keeps the file's dtype). variant="fp16" prefers the
    `.fp16` files when both exist; a folder with only the fp16 files is read without asking.
    """
    folder = Path(folder)
    config = read_config(folder)
    model = build_text_encoder(config, source=str(folder / "config.json"))
    path = find_weights(folder, "model", variant=variant)
    state = read_weights(path)
    if "CLIPModel" in (config.get("architectures") or []):
        state = {k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection."))}
    state = t5_keys(state, path) if isinstance(model, t5.T5EncoderModel) else clip_keys(state)
    return load_into(model, state, source=str(path), dtype=dtype)
